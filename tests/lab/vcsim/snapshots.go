package main

// Point-in-time snapshots. The simulator keeps the snapshot tree and objects; we capture
// the disks (with the guest's freeze hooks around each capture), point the snapshot's
// config at the captures, delete them on removal, and fix the removal task's entity.
// QEMU-backed VMs: hostd takes and removes the snapshots instead (hostd.go); the
// bookkeeping here is shared.

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	sideVMType       = "StillpointVM"
	sideSnapshotType = "StillpointSnapshot"
	hookTimeout      = 60 * time.Second
)

// StillpointVM receives the VirtualMachine methods we implement (see front.go).
type StillpointVM struct {
	SideObject
	lab *lab
	vm  types.ManagedObjectReference
}

// StillpointSnapshot receives RemoveSnapshot_Task for a snapshot we created.
type StillpointSnapshot struct {
	SideObject
	lab  *lab
	snap types.ManagedObjectReference
}

func notFound(ref types.ManagedObjectReference) *soap.Fault {
	return simulator.Fault("", &types.ManagedObjectNotFound{Obj: ref})
}

// runTask runs fn in the background and records its outcome the way simulator.Task.Run
// does, with the task's lock held only for the updates (so clients can watch it).
func runTask(task *simulator.Task, fn func() (types.AnyType, types.BaseMethodFault)) {
	runTaskMsg(task, func() (types.AnyType, types.BaseMethodFault, string) {
		res, fault := fn()
		return res, fault, ""
	})
}

// runTaskMsg is runTask with a message for the task's error (info.error.localizedMessage).
func runTaskMsg(task *simulator.Task, fn func() (types.AnyType, types.BaseMethodFault, string)) {
	simulator.Map.WithLock(task, func() {
		simulator.Map.Update(task, []types.PropertyChange{
			{Name: "info.startTime", Val: time.Now()},
			{Name: "info.state", Val: types.TaskInfoStateRunning},
		})
	})
	res, fault, msg := func() (res types.AnyType, fault types.BaseMethodFault, msg string) {
		defer func() { // a bug of ours fails the task, not the whole simulator
			if r := recover(); r != nil {
				log.Printf("task %s panicked: %v\n%s", task.Self.Value, r, debug.Stack())
				res, fault, msg = nil, &types.SystemError{Reason: fmt.Sprint(r)}, fmt.Sprintf("internal error: %v", r)
			}
		}()
		return fn()
	}()
	state := types.TaskInfoStateSuccess
	var lf interface{}
	if fault != nil {
		state = types.TaskInfoStateError
		if msg == "" {
			msg = fmt.Sprintf("%T", fault)
		}
		lf = types.LocalizedMethodFault{Fault: fault, LocalizedMessage: msg}
	}
	simulator.Map.WithLock(task, func() {
		simulator.Map.Update(task, []types.PropertyChange{
			{Name: "info.completeTime", Val: time.Now()},
			{Name: "info.state", Val: state},
			{Name: "info.result", Val: res},
			{Name: "info.error", Val: lf},
		})
	})
}

func (s *StillpointVM) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	sim, ok := simulator.Map.Get(s.vm).(*simulator.VirtualMachine)
	if !ok {
		return &methods.CreateSnapshot_TaskBody{Fault_: notFound(s.vm)}
	}
	req.This = s.vm
	task := simulator.CreateTask(sim, "createSnapshotTask", nil) // info.name CreateSnapshot_Task
	var name string
	simulator.Map.WithLock(sim, func() { name = sim.Name })
	simulator.Map.WithLock(task, func() { task.Info.EntityName = name })
	go runTaskMsg(task, func() (types.AnyType, types.BaseMethodFault, string) {
		return s.lab.createSnapshot(sim, req)
	})
	return &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: task.Self}}
}

type liveDisk struct {
	key      int32
	desc     string // absolute descriptor path
	capacity int64
}

func (l *lab) createSnapshot(sim *simulator.VirtualMachine, req *types.CreateSnapshot_Task) (types.AnyType, types.BaseMethodFault, string) {
	lvm := l.ensureLabVM(sim)
	l.mu.Lock()
	k := lvm.knobs
	l.mu.Unlock()
	if k.SnapshotDelay > 0 {
		time.Sleep(k.SnapshotDelay)
	}
	if k.SnapshotFail {
		return nil, &types.SnapshotFault{}, "snapshot_fail knob"
	}
	if l.isQEMU(lvm) {
		return l.createSnapshotQEMU(sim, lvm, req)
	}
	snap, fault := l.captureSnapshot(sim, lvm, req)
	return snap, fault, ""
}

// captureSnapshot: a snapshot of a VM that is not QEMU-backed captures its disks.
func (l *lab) captureSnapshot(sim *simulator.VirtualMachine, lvm *labVM, req *types.CreateSnapshot_Task) (types.AnyType, types.BaseMethodFault) {
	var disks []liveDisk
	var ferr error
	simulator.Map.WithLock(sim, func() {
		for _, dev := range sim.Config.Hardware.Device {
			disk, ok := dev.(*types.VirtualDisk)
			if !ok {
				continue
			}
			b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			desc, err := l.datastoreFile(b.FileName)
			if err != nil {
				ferr = err
				return
			}
			disks = append(disks, liveDisk{key: disk.Key, desc: desc, capacity: diskCapacity(disk)})
		}
	})
	if ferr != nil {
		log.Printf("snapshot %s: %v", lvm.name, ferr)
		return nil, &types.SnapshotFault{}
	}

	captures := map[int32]*capture{}
	cleanup := func() {
		for _, c := range captures {
			_ = os.Remove(c.flat)
			_ = os.Remove(c.descriptor)
		}
	}
	seq := l.nextCaptureSeq(lvm, disks)
	for _, d := range disks {
		c, err := l.captureOne(lvm, d, seq)
		if err != nil {
			log.Printf("snapshot %s disk %d: %v", lvm.name, d.key, err)
			cleanup()
			return nil, &types.FileFault{File: d.desc}
		}
		captures[d.key] = c
	}
	snap, fault := l.recordSnapshot(sim, lvm, req, captures, "")
	if fault != nil {
		cleanup()
		return nil, fault
	}
	return snap, nil
}

// recordSnapshot makes the simulator's snapshot, points its disk backings at the captures
// (changeIds: from hostd for QEMU-backed VMs, else numbered here) and records it.
func (l *lab) recordSnapshot(sim *simulator.VirtualMachine, lvm *labVM, req *types.CreateSnapshot_Task,
	captures map[int32]*capture, hostdID string) (types.AnyType, types.BaseMethodFault) {
	var snapRef types.ManagedObjectReference
	var fault types.BaseMethodFault
	simulator.Map.WithLock(sim, func() {
		body := sim.CreateSnapshotTask(req).(*methods.CreateSnapshot_TaskBody)
		inner := simulator.Map.Get(body.Res.Returnval).(*simulator.Task)
		if inner.Info.Error != nil {
			fault = inner.Info.Error.Fault
			return
		}
		snapRef = inner.Info.Result.(types.ManagedObjectReference)
		cbtOn := sim.Config.ChangeTrackingEnabled != nil && *sim.Config.ChangeTrackingEnabled

		l.mu.Lock()
		l.syncCBT(lvm, cbtOn)
		if cbtOn && hostdID == "" {
			for key, c := range captures {
				lvm.cbtSeq++
				c.changeID = lvm.cbtEpoch + "/" + strconv.Itoa(lvm.cbtSeq)
				if lvm.changes[key] == nil {
					lvm.changes[key] = map[string]*blockMap{}
				}
				lvm.changes[key][c.changeID] = c.blocks
			}
		}
		l.snaps[snapRef.Value] = &snapRecord{vm: sim.Self.Value, disks: captures, vmsn: l.vmsnFile(sim, snapRef), hostdID: hostdID}
		l.mu.Unlock()

		snap := simulator.Map.Get(snapRef).(*simulator.VirtualMachineSnapshot)
		simulator.Map.WithLock(snap, func() {
			snap.Config.Hardware.Device = snapshotDevices(snap.Config.Hardware.Device, captures)
		})
	})
	if fault != nil {
		return nil, fault
	}
	simulator.Map.Put(&StillpointSnapshot{SideObject: newSideObject(sideRef(snapRef)), lab: l, snap: snapRef})
	return snapRef, nil
}

// snapshotDevices copies the device list with each disk's backing naming its capture.
// The copy matters: the simulator's snapshot config shares the VM's device slice.
func snapshotDevices(devs []types.BaseVirtualDevice, captures map[int32]*capture) []types.BaseVirtualDevice {
	out := make([]types.BaseVirtualDevice, len(devs))
	for i, dev := range devs {
		out[i] = dev
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		c, ok := captures[disk.Key]
		b, isFlat := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || !isFlat {
			continue
		}
		nd := *disk
		nb := *b
		nb.FileName = c.dsPath
		nb.ChangeId = c.changeID
		nd.Backing = &nb
		out[i] = &nd
	}
	return out
}

// captureOne captures one disk: pre hook, copy, post hook (even if the copy failed).
func captureName(d liveDisk, seq int) string {
	return fmt.Sprintf("%s-%06d.vmdk", strings.TrimSuffix(d.desc, ".vmdk"), seq)
}

// nextCaptureSeq picks N for this snapshot's <disk>-00000N.vmdk files, free for every disk.
func (l *lab) nextCaptureSeq(lvm *labVM, disks []liveDisk) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		lvm.captureSeq++
		free := true
		for _, d := range disks {
			if _, err := os.Stat(flatPath(captureName(d, lvm.captureSeq))); !os.IsNotExist(err) {
				free = false
			}
		}
		if free {
			return lvm.captureSeq
		}
	}
}

func (l *lab) captureOne(lvm *labVM, d liveDisk, seq int) (*capture, error) {
	l.mu.Lock()
	hooks := lvm.hooks[d.key]
	l.mu.Unlock()
	desc := captureName(d, seq)

	c := &capture{descriptor: desc, flat: flatPath(desc)}
	rel, err := filepath.Rel(l.cfg.DatastoreDir, desc)
	if err != nil {
		return nil, err
	}
	c.dsPath = fmt.Sprintf("[%s] %s", datastoreName, filepath.ToSlash(rel))
	c.capacity = d.capacity

	env := []string{
		"STILLPOINT_VM=" + lvm.name,
		"STILLPOINT_DISK_KEY=" + strconv.Itoa(int(d.key)),
		"STILLPOINT_FLAT_FILE=" + flatPath(d.desc),
	}
	l.inflight.Add(1) // SIGTERM waits for the post hook (a guest may be frozen)
	defer l.inflight.Add(-1)
	var preErr, copyErr error
	if len(hooks.Pre) > 0 {
		preErr = runHook(hooks.Pre, env)
	}
	if preErr == nil {
		copyErr = captureDisk(flatPath(d.desc), c.flat, d.capacity)
	}
	var postErr error
	if len(hooks.Post) > 0 {
		postErr = runHook(hooks.Post, env)
	}
	for _, err := range []error{preErr, copyErr, postErr} {
		if err != nil {
			_ = os.Remove(c.flat)
			return nil, err
		}
	}
	// After the post hook: the guest is thawed while the (stable) capture is hashed.
	blocks, err := scanBlocks(c.flat, d.capacity)
	if err != nil {
		_ = os.Remove(c.flat)
		return nil, err
	}
	c.blocks = blocks
	if err := writeDescriptor(c.descriptor, d.capacity); err != nil {
		_ = os.Remove(c.flat)
		return nil, err
	}
	return c, nil
}

func runHook(argv []string, env []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), hookTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if len(out) > 0 {
		log.Printf("hook %s: %s", argv[0], strings.TrimSpace(string(out)))
	}
	if err != nil {
		return fmt.Errorf("hook %v: %w", argv, err)
	}
	return nil
}

func snapshotRefs(tree []types.VirtualMachineSnapshotTree, out []types.ManagedObjectReference) []types.ManagedObjectReference {
	for _, n := range tree {
		out = append(out, n.Snapshot)
		out = snapshotRefs(n.ChildSnapshotList, out)
	}
	return out
}

func findNode(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) *types.VirtualMachineSnapshotTree {
	for i := range tree {
		if tree[i].Snapshot == ref {
			return &tree[i]
		}
		if n := findNode(tree[i].ChildSnapshotList, ref); n != nil {
			return n
		}
	}
	return nil
}

// vmsnFile finds the .vmsn file the simulator just made for a snapshot (its layout keys
// are right only until the next storage refresh). Caller holds the VM's lock.
func (l *lab) vmsnFile(vm *simulator.VirtualMachine, snap types.ManagedObjectReference) string {
	for _, sl := range vm.LayoutEx.Snapshot {
		if sl.Key != snap {
			continue
		}
		for _, f := range vm.LayoutEx.File {
			if f.Key == sl.DataKey && strings.HasSuffix(f.Name, ".vmsn") {
				if abs, err := l.datastoreFile(f.Name); err == nil {
					return abs
				}
			}
		}
	}
	return ""
}

// unkeySnapshotFiles stops the simulator's snapshot removal from deleting files: it deletes
// by layout keys that RefreshStorageInfo renumbers, so a later removal can hit any file of
// the VM, the live flat disk included. We delete snapshot files ourselves (dropSnapshots).
// Caller holds the VM's lock.
func unkeySnapshotFiles(vm *simulator.VirtualMachine, refs []types.ManagedObjectReference) {
	const noFile = -1 << 30
	for i := range vm.LayoutEx.Snapshot {
		for _, ref := range refs {
			if vm.LayoutEx.Snapshot[i].Key == ref {
				vm.LayoutEx.Snapshot[i].DataKey = noFile
				vm.LayoutEx.Snapshot[i].MemoryKey = noFile
			}
		}
	}
}

// dropSnapshots deletes the captures of removed snapshots and forgets them; the block
// maps stay reachable by changeId.
func (l *lab) dropSnapshots(refs []types.ManagedObjectReference) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ref := range refs {
		rec, ok := l.snaps[ref.Value]
		if !ok {
			continue
		}
		for _, c := range rec.disks {
			if c.external { // hostd's base disk: its delta was committed into it
				continue
			}
			_ = os.Remove(c.flat)
			_ = os.Remove(c.descriptor)
		}
		if rec.vmsn != "" {
			_ = os.Remove(rec.vmsn)
		}
		delete(l.snaps, ref.Value)
		simulator.Map.Remove(sideRef(ref))
	}
}

func (s *StillpointVM) RemoveAllSnapshotsTask(ctx *simulator.Context, req *types.RemoveAllSnapshots_Task) soap.HasFault {
	sim, ok := simulator.Map.Get(s.vm).(*simulator.VirtualMachine)
	if !ok {
		return &methods.RemoveAllSnapshots_TaskBody{Fault_: notFound(s.vm)}
	}
	req.This = s.vm
	if lvm := s.lab.ensureLabVM(sim); s.lab.isQEMU(lvm) {
		return s.removeAllSnapshotsQEMU(ctx, sim, lvm, req)
	}
	var refs []types.ManagedObjectReference
	var body soap.HasFault
	inner := *ctx
	inner.Caller = &s.vm
	simulator.Map.WithLock(sim, func() {
		if sim.Snapshot != nil {
			refs = snapshotRefs(sim.Snapshot.RootSnapshotList, nil)
		}
		unkeySnapshotFiles(sim, refs)
		body = sim.RemoveAllSnapshotsTask(&inner, req)
	})
	s.lab.dropSnapshots(refs)
	return body
}

// removeAllSnapshotsQEMU: hostd commits the deltas (asynchronously: a commit takes time),
// then the simulator forgets the snapshots, also when a commit failed (the VM then needs
// consolidation and the task fails).
func (s *StillpointVM) removeAllSnapshotsQEMU(ctx *simulator.Context, sim *simulator.VirtualMachine, lvm *labVM,
	req *types.RemoveAllSnapshots_Task) soap.HasFault {
	task := newVMTask(sim, "removeAllSnapshotsTask")
	inner := taskContext(ctx, &s.vm)
	go runTaskMsg(task, func() (types.AnyType, types.BaseMethodFault, string) {
		var refs []types.ManagedObjectReference
		simulator.Map.WithLock(sim, func() {
			if sim.Snapshot != nil {
				refs = snapshotRefs(sim.Snapshot.RootSnapshotList, nil)
			}
		})
		e := s.lab.removeSnapshotsQEMU(sim, lvm.name, refs)
		simulator.Map.WithLock(sim, func() {
			unkeySnapshotFiles(sim, refs)
			sim.RemoveAllSnapshotsTask(inner, req)
		})
		s.lab.dropSnapshots(refs)
		if e != nil {
			return nil, e.vimFault(), e.Message
		}
		return nil, nil, ""
	})
	return &methods.RemoveAllSnapshots_TaskBody{Res: &types.RemoveAllSnapshots_TaskResponse{Returnval: task.Self}}
}

func (s *StillpointSnapshot) RemoveSnapshotTask(ctx *simulator.Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	real, ok := simulator.Map.Get(s.snap).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return &methods.RemoveSnapshot_TaskBody{Fault_: notFound(s.snap)}
	}
	req.This = s.snap
	var vmRef types.ManagedObjectReference
	simulator.Map.WithLock(real, func() { vmRef = real.Vm })
	sim, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		return &methods.RemoveSnapshot_TaskBody{Fault_: notFound(vmRef)}
	}
	var refs []types.ManagedObjectReference
	var vmName string
	simulator.Map.WithLock(sim, func() {
		vmName = sim.Name
		if sim.Snapshot == nil {
			return
		}
		if n := findNode(sim.Snapshot.RootSnapshotList, s.snap); n != nil {
			refs = append(refs, s.snap)
			if req.RemoveChildren {
				refs = snapshotRefs(n.ChildSnapshotList, refs)
			}
		}
		unkeySnapshotFiles(sim, refs)
	})
	if lvm := s.lab.ensureLabVM(sim); s.lab.isQEMU(lvm) {
		return s.removeSnapshotQEMU(ctx, sim, lvm, real, refs, req)
	}
	inner := *ctx
	inner.Caller = &s.snap
	var body soap.HasFault
	simulator.Map.WithLock(real, func() { body = real.RemoveSnapshotTask(&inner, req) })
	if b, ok := body.(*methods.RemoveSnapshot_TaskBody); ok && b.Res != nil {
		fixSnapshotTask(b.Res.Returnval, vmRef, vmName, "RemoveSnapshot_Task")
	}
	s.lab.dropSnapshots(refs)
	return body
}

// removeSnapshotQEMU: as removeAllSnapshotsQEMU, for one snapshot (and its children).
func (s *StillpointSnapshot) removeSnapshotQEMU(ctx *simulator.Context, sim *simulator.VirtualMachine, lvm *labVM,
	real *simulator.VirtualMachineSnapshot, refs []types.ManagedObjectReference, req *types.RemoveSnapshot_Task) soap.HasFault {
	task := newVMTask(sim, "removeSnapshotTask")
	inner := taskContext(ctx, &s.snap)
	go runTaskMsg(task, func() (types.AnyType, types.BaseMethodFault, string) {
		e := s.lab.removeSnapshotsQEMU(sim, lvm.name, refs)
		var body soap.HasFault
		simulator.Map.WithLock(real, func() { body = real.RemoveSnapshotTask(inner, req) })
		if b, ok := body.(*methods.RemoveSnapshot_TaskBody); ok && b.Res != nil {
			fixSnapshotTask(b.Res.Returnval, lvm.ref, lvm.name, "RemoveSnapshot_Task")
		}
		s.lab.dropSnapshots(refs)
		if e != nil {
			return nil, e.vimFault(), e.Message
		}
		return nil, nil, ""
	})
	return &methods.RemoveSnapshot_TaskBody{Res: &types.RemoveSnapshot_TaskResponse{Returnval: task.Self}}
}

// fixSnapshotTask: pyVmomi rejects a Snapshot as Task.info.entity (it must be a
// ManagedEntity); vCenter reports the VM there. The name becomes the WSDL method name.
func fixSnapshotTask(task, vmRef types.ManagedObjectReference, vmName, method string) {
	t, ok := simulator.Map.Get(task).(*simulator.Task)
	if !ok {
		return
	}
	simulator.Map.WithLock(t, func() {
		simulator.Map.Update(t, []types.PropertyChange{
			{Name: "info.entity", Val: &vmRef},
			{Name: "info.entityName", Val: vmName},
			{Name: "info.name", Val: method},
		})
	})
}

// RevertToSnapshotTask keeps the simulator's behaviour (only snapshot.currentSnapshot
// moves; the live disk is not rolled back) with the task's entity fixed.
func (s *StillpointSnapshot) RevertToSnapshotTask(ctx *simulator.Context, req *types.RevertToSnapshot_Task) soap.HasFault {
	real, ok := simulator.Map.Get(s.snap).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return &methods.RevertToSnapshot_TaskBody{Fault_: notFound(s.snap)}
	}
	req.This = s.snap
	var vmRef types.ManagedObjectReference
	simulator.Map.WithLock(real, func() { vmRef = real.Vm })
	sim, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		return &methods.RevertToSnapshot_TaskBody{Fault_: notFound(vmRef)}
	}
	var vmName string
	simulator.Map.WithLock(sim, func() { vmName = sim.Name })
	var body soap.HasFault
	simulator.Map.WithLock(real, func() { body = real.RevertToSnapshotTask(req) })
	if b, ok := body.(*methods.RevertToSnapshot_TaskBody); ok && b.Res != nil {
		fixSnapshotTask(b.Res.Returnval, vmRef, vmName, "RevertToSnapshot_Task")
	}
	return body
}
