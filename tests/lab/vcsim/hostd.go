package main

// QEMU-backed VMs: the lab's host agent (stillpoint_lab/hostd.py, "hostd", the lab's ESXi
// host agent) owns their QEMU processes; the simulator keeps the inventory and delegates:
//
//	PowerOnVM_Task / PowerOffVM_Task / ResetVM_Task  -> /vm/power-on, /vm/power-off, /vm/reset
//	CreateSnapshot_Task                              -> /vm/snapshot/create (external snapshot)
//	RemoveSnapshot_Task / RemoveAllSnapshots_Task    -> /vm/snapshot/remove (a fault: consolidation needed)
//	ConsolidateVMDisks_Task                          -> /vm/consolidate
//	QueryChangedDiskAreas                            -> /vm/cbt/query (dirty bitmaps)
//	the cbt_reset knob, CBT switched off             -> /vm/cbt/reset
//	Destroy_Task of a running VM                     -> /vm/power-off, then /vm/forget
//
// and hostd reports what the guest agent sees with POST /lab/guest (serveGuestReport).
// hostd speaks HTTP/1.1 + JSON on a unix socket; a fault is 4xx/5xx
// {"fault": "<vim fault class>", "message": "..."} (docs/lab-hypervisor.md).
// VMs that are not QEMU-backed keep the simulator's power operations (passed through here
// unchanged), captured snapshots and hash CBT.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	hostdShortTimeout  = 30 * time.Second
	hostdPowerTimeout  = 2 * time.Minute
	hostdSnapTimeout   = 5 * time.Minute  // a quiesced snapshot waits for the guest's freeze hooks
	hostdCommitTimeout = 30 * time.Minute // block-commit of a delta into its base
	sandboxKey         = "stillpoint.sandbox"
)

// hostdClient calls hostd over its unix socket.
type hostdClient struct {
	socket string
	http   *http.Client
}

func newHostdClient(socket string) *hostdClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     30 * time.Second,
	}
	return &hostdClient{socket: socket, http: &http.Client{Transport: tr}}
}

// hostdError is a fault hostd replied with (or "HostCommunication" when it could not be
// reached, as vCenter says of a host that does not answer).
type hostdError struct {
	Fault   string `json:"fault"`
	Message string `json:"message"`
}

func (e *hostdError) Error() string { return e.Fault + ": " + e.Message }

// vimFault maps hostd's fault class to the vSphere fault, carrying hostd's message.
func (e *hostdError) vimFault() types.BaseMethodFault {
	var f types.BaseMethodFault
	switch e.Fault {
	case "SnapshotFault":
		f = &types.SnapshotFault{}
	case "FileFault":
		f = &types.FileFault{File: e.Message}
	case "ApplicationQuiesceFault":
		f = &types.ApplicationQuiesceFault{}
	case "InvalidState":
		f = &types.InvalidState{}
	case "NotFound":
		f = &types.NotFound{}
	case "HostCommunication":
		f = &types.HostCommunication{}
	default:
		f = &types.SystemError{Reason: e.Error()}
	}
	f.GetMethodFault().FaultMessage = []types.LocalizableMessage{{Key: "stillpoint.hostd", Message: e.Message}}
	return f
}

// call POSTs req as JSON to hostd and decodes its reply into resp (nil: ignored).
func (h *hostdClient) call(path string, timeout time.Duration, req, resp interface{}) *hostdError {
	body, err := json.Marshal(req)
	if err != nil {
		return &hostdError{Fault: "SystemError", Message: err.Error()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://hostd"+path, bytes.NewReader(body))
	if err != nil {
		return &hostdError{Fault: "SystemError", Message: err.Error()}
	}
	r.Header.Set("Content-Type", "application/json")
	start := time.Now()
	res, err := h.http.Do(r)
	if err != nil {
		log.Printf("hostd %s: %v", path, err)
		return &hostdError{Fault: "HostCommunication", Message: "hostd " + path + ": " + err.Error()}
	}
	defer res.Body.Close()
	data, err := io.ReadAll(io.LimitReader(res.Body, 64<<20))
	if err != nil {
		return &hostdError{Fault: "HostCommunication", Message: "hostd " + path + ": " + err.Error()}
	}
	if res.StatusCode != http.StatusOK {
		var e hostdError
		if json.Unmarshal(data, &e) != nil || e.Fault == "" {
			e = hostdError{Fault: "SystemError", Message: fmt.Sprintf("hostd %s: HTTP %d: %.200s", path, res.StatusCode, data)}
		}
		log.Printf("hostd %s: %s (%s)", path, e.Error(), time.Since(start).Round(time.Millisecond))
		return &e
	}
	if resp != nil {
		if err := json.Unmarshal(data, resp); err != nil {
			return &hostdError{Fault: "SystemError", Message: "hostd " + path + ": bad reply: " + err.Error()}
		}
	}
	return nil
}

// isQEMU: the VM's power, snapshots and CBT are hostd's.
func (l *lab) isQEMU(lvm *labVM) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return lvm.qemu && l.hostd != nil
}

// taskContext is a copy of the caller's context for work that outlives the call, with the
// VM marked as locked by us (the simulator's methods then do not lock it again).
func taskContext(ctx *simulator.Context, vm *types.ManagedObjectReference) *simulator.Context {
	inner := *ctx
	inner.Context = context.Background()
	inner.Caller = vm
	if inner.Session == nil { // PostEvent names the session's user
		inner.Session = &simulator.Session{
			UserSession: types.UserSession{Key: uuid.New().String(), UserName: "vpxuser"},
			Registry:    simulator.NewRegistry(),
		}
	}
	return &inner
}

// newVMTask makes a queued task on the VM with the WSDL method name (e.g. "powerOnVMTask"
// -> "PowerOnVM_Task") and the VM's name as the entity name.
func newVMTask(sim *simulator.VirtualMachine, name string) *simulator.Task {
	task := simulator.CreateTask(sim, name, nil)
	var vmName string
	simulator.Map.WithLock(sim, func() { vmName = sim.Name })
	simulator.Map.WithLock(task, func() { task.Info.EntityName = vmName })
	return task
}

// --- power ------------------------------------------------------------------------------

type hostdDisk struct {
	Key           int32  `json:"key"`
	Flat          string `json:"flat"`
	CapacityBytes int64  `json:"capacity_bytes"`
}

type powerOnRequest struct {
	VM        string            `json:"vm"`
	UUID      string            `json:"uuid"`
	MemoryMiB int64             `json:"memory_mib"`
	CPUs      int32             `json:"cpus"`
	MAC       string            `json:"mac"`
	Disks     []hostdDisk       `json:"disks"`
	Guestinfo map[string]string `json:"guestinfo"`
	Sandbox   bool              `json:"sandbox"`
}

type vmRequest struct {
	VM string `json:"vm"`
}

// powerOnSpec is what hostd needs to run the VM. Caller holds the VM's lock.
func (l *lab) powerOnSpec(sim *simulator.VirtualMachine) (powerOnRequest, error) {
	spec := powerOnRequest{
		VM: sim.Name, UUID: sim.Config.Uuid, MemoryMiB: int64(sim.Config.Hardware.MemoryMB),
		CPUs: sim.Config.Hardware.NumCPU, Guestinfo: map[string]string{},
	}
	for _, dev := range sim.Config.Hardware.Device {
		switch d := dev.(type) {
		case *types.VirtualDisk:
			b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			desc, err := l.datastoreFile(b.FileName)
			if err != nil {
				return spec, err
			}
			spec.Disks = append(spec.Disks, hostdDisk{Key: d.Key, Flat: flatPath(desc), CapacityBytes: diskCapacity(d)})
		case types.BaseVirtualEthernetCard:
			if spec.MAC == "" {
				spec.MAC = d.GetVirtualEthernetCard().MacAddress
			}
		}
	}
	for _, o := range sim.Config.ExtraConfig {
		opt := o.GetOptionValue()
		value := fmt.Sprint(opt.Value)
		switch {
		case strings.HasPrefix(opt.Key, "guestinfo."):
			spec.Guestinfo[opt.Key] = value
		case opt.Key == sandboxKey:
			spec.Sandbox = true
		}
	}
	return spec, nil
}

// beginPower marks a power operation in progress (one at a time per VM).
func (l *lab) beginPower(lvm *labVM) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if lvm.powerBusy {
		return false
	}
	lvm.powerBusy = true
	return true
}

func (l *lab) endPower(lvm *labVM) {
	l.mu.Lock()
	lvm.powerBusy = false
	l.mu.Unlock()
}

func powerState(sim *simulator.VirtualMachine) types.VirtualMachinePowerState {
	var st types.VirtualMachinePowerState
	simulator.Map.WithLock(sim, func() { st = sim.Runtime.PowerState })
	return st
}

// clearGuest: what vCenter shows of a powered-off VM's guest. Caller holds the VM's lock.
func clearGuest(sim *simulator.VirtualMachine) {
	setGuest(sim, vmConfig{GuestID: sim.Config.GuestId})
}

// simPower does the simulator's own bookkeeping of a power change (state, boot time,
// events) once hostd made it real.
func simPower(ctx *simulator.Context, sim *simulator.VirtualMachine, on bool) {
	simulator.Map.WithLock(sim, func() {
		if (sim.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn) == on {
			return
		}
		if on {
			sim.PowerOnVMTask(ctx, &types.PowerOnVM_Task{This: sim.Self})
		} else {
			sim.PowerOffVMTask(ctx, &types.PowerOffVM_Task{This: sim.Self})
			clearGuest(sim)
		}
	})
}

// qemuPowerTask runs a power operation of a QEMU-backed VM as an asynchronous task.
func (s *StillpointVM) qemuPowerTask(ctx *simulator.Context, sim *simulator.VirtualMachine, lvm *labVM,
	name string, fn func(*simulator.Context) (types.AnyType, types.BaseMethodFault, string)) (types.ManagedObjectReference, *soap.Fault) {
	if !s.lab.beginPower(lvm) {
		return types.ManagedObjectReference{}, simulator.Fault("another power operation is in progress", &types.TaskInProgress{Task: s.vm})
	}
	task := newVMTask(sim, name)
	inner := taskContext(ctx, &s.vm)
	go runTaskMsg(task, func() (types.AnyType, types.BaseMethodFault, string) {
		defer s.lab.endPower(lvm)
		return fn(inner)
	})
	return task.Self, nil
}

func (s *StillpointVM) PowerOnVMTask(ctx *simulator.Context, req *types.PowerOnVM_Task) soap.HasFault {
	sim, ok := simulator.Map.Get(s.vm).(*simulator.VirtualMachine)
	if !ok {
		return &methods.PowerOnVM_TaskBody{Fault_: notFound(s.vm)}
	}
	req.This = s.vm
	lvm := s.lab.ensureLabVM(sim)
	if !s.lab.isQEMU(lvm) {
		var body soap.HasFault
		simulator.Map.WithLock(sim, func() { body = sim.PowerOnVMTask(taskContext(ctx, &s.vm), req) })
		return body
	}
	task, fault := s.qemuPowerTask(ctx, sim, lvm, "powerOnVMTask", func(inner *simulator.Context) (types.AnyType, types.BaseMethodFault, string) {
		var spec powerOnRequest
		var err error
		var state types.VirtualMachinePowerState
		var template bool
		simulator.Map.WithLock(sim, func() {
			state, template = sim.Runtime.PowerState, sim.Config.Template
			spec, err = s.lab.powerOnSpec(sim)
		})
		if template {
			return nil, &types.InvalidState{}, "cannot power on a template"
		}
		if state == types.VirtualMachinePowerStatePoweredOn {
			return nil, &types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOn, ExistingState: state}, ""
		}
		if err != nil {
			return nil, &types.InvalidState{}, err.Error()
		}
		var reply struct {
			PID int `json:"pid"`
		}
		start := time.Now()
		if e := s.lab.hostd.call("/vm/power-on", hostdPowerTimeout, spec, &reply); e != nil {
			return nil, e.vimFault(), e.Message
		}
		log.Printf("%s: powered on by hostd (QEMU pid %d) in %s", spec.VM, reply.PID, time.Since(start).Round(time.Millisecond))
		simPower(inner, sim, true)
		return nil, nil, ""
	})
	if fault != nil {
		return &methods.PowerOnVM_TaskBody{Fault_: fault}
	}
	return &methods.PowerOnVM_TaskBody{Res: &types.PowerOnVM_TaskResponse{Returnval: task}}
}

// hostdPowerOff stops the VM's QEMU; a VM hostd does not run (it stopped by itself, or
// hostd restarted) counts as stopped.
func (l *lab) hostdPowerOff(name string) *hostdError {
	e := l.hostd.call("/vm/power-off", hostdPowerTimeout, vmRequest{VM: name}, nil)
	if e != nil && (e.Fault == "InvalidState" || e.Fault == "NotFound") {
		log.Printf("%s: power-off: hostd runs no QEMU for it (%s): powered off", name, e.Message)
		return nil
	}
	return e
}

func (s *StillpointVM) PowerOffVMTask(ctx *simulator.Context, req *types.PowerOffVM_Task) soap.HasFault {
	sim, ok := simulator.Map.Get(s.vm).(*simulator.VirtualMachine)
	if !ok {
		return &methods.PowerOffVM_TaskBody{Fault_: notFound(s.vm)}
	}
	req.This = s.vm
	lvm := s.lab.ensureLabVM(sim)
	if !s.lab.isQEMU(lvm) {
		var body soap.HasFault
		simulator.Map.WithLock(sim, func() { body = sim.PowerOffVMTask(taskContext(ctx, &s.vm), req) })
		return body
	}
	task, fault := s.qemuPowerTask(ctx, sim, lvm, "powerOffVMTask", func(inner *simulator.Context) (types.AnyType, types.BaseMethodFault, string) {
		if st := powerState(sim); st != types.VirtualMachinePowerStatePoweredOn {
			return nil, &types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOff, ExistingState: st}, ""
		}
		if e := s.lab.hostdPowerOff(lvm.name); e != nil {
			return nil, e.vimFault(), e.Message
		}
		simPower(inner, sim, false)
		return nil, nil, ""
	})
	if fault != nil {
		return &methods.PowerOffVM_TaskBody{Fault_: fault}
	}
	return &methods.PowerOffVM_TaskBody{Res: &types.PowerOffVM_TaskResponse{Returnval: task}}
}

func (s *StillpointVM) ResetVMTask(ctx *simulator.Context, req *types.ResetVM_Task) soap.HasFault {
	sim, ok := simulator.Map.Get(s.vm).(*simulator.VirtualMachine)
	if !ok {
		return &methods.ResetVM_TaskBody{Fault_: notFound(s.vm)}
	}
	req.This = s.vm
	lvm := s.lab.ensureLabVM(sim)
	if !s.lab.isQEMU(lvm) {
		var body soap.HasFault
		simulator.Map.WithLock(sim, func() { body = sim.ResetVMTask(taskContext(ctx, &s.vm), req) })
		return body
	}
	task, fault := s.qemuPowerTask(ctx, sim, lvm, "resetVMTask", func(inner *simulator.Context) (types.AnyType, types.BaseMethodFault, string) {
		if st := powerState(sim); st != types.VirtualMachinePowerStatePoweredOn {
			return nil, &types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOn, ExistingState: st}, ""
		}
		if e := s.lab.hostd.call("/vm/reset", hostdPowerTimeout, vmRequest{VM: lvm.name}, nil); e != nil {
			return nil, e.vimFault(), e.Message
		}
		simulator.Map.WithLock(sim, func() {
			simulator.Map.Update(sim, []types.PropertyChange{{Name: "summary.runtime.bootTime", Val: time.Now()}})
			clearGuest(sim) // the guest boots again; hostd reports it when its agent answers
		})
		return nil, nil, ""
	})
	if fault != nil {
		return &methods.ResetVM_TaskBody{Fault_: fault}
	}
	return &methods.ResetVM_TaskBody{Res: &types.ResetVM_TaskResponse{Returnval: task}}
}

// DestroyTask: a running QEMU-backed VM is powered off first, and hostd forgets it.
func (s *StillpointVM) DestroyTask(ctx *simulator.Context, req *types.Destroy_Task) soap.HasFault {
	sim, ok := simulator.Map.Get(s.vm).(*simulator.VirtualMachine)
	if !ok {
		return &methods.Destroy_TaskBody{Fault_: notFound(s.vm)}
	}
	req.This = s.vm
	lvm := s.lab.ensureLabVM(sim)
	inner := taskContext(ctx, &s.vm)
	if s.lab.isQEMU(lvm) {
		if powerState(sim) == types.VirtualMachinePowerStatePoweredOn {
			if e := s.lab.hostdPowerOff(lvm.name); e != nil {
				return &methods.Destroy_TaskBody{Fault_: simulator.Fault(e.Message, e.vimFault())}
			}
			simPower(inner, sim, false)
		}
		if e := s.lab.hostd.call("/vm/forget", hostdShortTimeout, vmRequest{VM: lvm.name}, nil); e != nil {
			log.Printf("%s: hostd forget: %v", lvm.name, e)
		}
	}
	var refs []types.ManagedObjectReference
	var body soap.HasFault
	simulator.Map.WithLock(sim, func() {
		if sim.Snapshot != nil {
			refs = snapshotRefs(sim.Snapshot.RootSnapshotList, nil)
		}
		body = sim.DestroyTask(inner, req)
	})
	s.lab.dropSnapshots(refs)
	return body
}

// --- snapshots --------------------------------------------------------------------------

type hostdSnapshotDisk struct {
	Key        int32  `json:"key"`
	FrozenFlat string `json:"frozen_flat"`
	ChangeID   string `json:"change_id"`
}

type hostdSnapshotReply struct {
	Disks     []hostdSnapshotDisk `json:"disks"`
	TimingsMs map[string]float64  `json:"timings_ms"`
}

// datastorePath maps an absolute file in the datastore to "[LocalDS_0] dir/file".
func (l *lab) datastorePath(abs string) (string, error) {
	rel, err := filepath.Rel(l.cfg.DatastoreDir, abs)
	if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return "", fmt.Errorf("%s is not in the datastore %s", abs, l.cfg.DatastoreDir)
	}
	return fmt.Sprintf("[%s] %s", datastoreName, filepath.ToSlash(rel)), nil
}

// createSnapshotQEMU: hostd takes the external snapshot (the base flat files stop
// changing); the snapshot's disk backings name them, with hostd's changeIds.
func (l *lab) createSnapshotQEMU(sim *simulator.VirtualMachine, lvm *labVM, req *types.CreateSnapshot_Task) (types.AnyType, types.BaseMethodFault, string) {
	var cbtOn bool
	capacities := map[int32]int64{}
	simulator.Map.WithLock(sim, func() {
		cbtOn = sim.Config.ChangeTrackingEnabled != nil && *sim.Config.ChangeTrackingEnabled
		for _, dev := range sim.Config.Hardware.Device {
			if d, ok := dev.(*types.VirtualDisk); ok {
				capacities[d.Key] = diskCapacity(d)
			}
		}
	})
	l.mu.Lock()
	lvm.captureSeq++
	id := fmt.Sprintf("%s-%d", lvm.ref.Value, lvm.captureSeq)
	l.mu.Unlock()

	l.inflight.Add(1) // SIGTERM waits: hostd may have the guest frozen
	defer l.inflight.Add(-1)
	var reply hostdSnapshotReply
	body := map[string]interface{}{"vm": lvm.name, "snapshot": id, "quiesce": req.Quiesce, "cbt": cbtOn}
	if e := l.hostd.call("/vm/snapshot/create", hostdSnapTimeout, body, &reply); e != nil {
		return nil, e.vimFault(), e.Message
	}
	log.Printf("snapshot %s of %s by hostd: timings %v ms", id, lvm.name, reply.TimingsMs)
	undo := func(why string) {
		log.Printf("snapshot %s of %s: %s: removing it from hostd", id, lvm.name, why)
		if e := l.hostd.call("/vm/snapshot/remove", hostdCommitTimeout, map[string]string{"vm": lvm.name, "snapshot": id}, nil); e != nil {
			log.Printf("snapshot %s of %s: undo: %v", id, lvm.name, e)
		}
	}
	captures := map[int32]*capture{}
	for _, d := range reply.Disks {
		// ESXi's snapshot disk backing names the disk's descriptor; the frozen flat file
		// is its extent (readers find it there, as they do on ESXi).
		named := d.FrozenFlat
		if desc := strings.TrimSuffix(named, "-flat.vmdk") + ".vmdk"; desc != named+".vmdk" {
			if _, serr := os.Stat(desc); serr == nil {
				named = desc
			}
		}
		ds, err := l.datastorePath(named)
		if err != nil {
			undo(err.Error())
			return nil, &types.SnapshotFault{}, err.Error()
		}
		c := &capture{flat: d.FrozenFlat, dsPath: ds, external: true, capacity: capacities[d.Key]}
		if cbtOn {
			c.changeID = d.ChangeID
		}
		captures[d.Key] = c
	}
	snap, fault := l.recordSnapshot(sim, lvm, req, captures, id)
	if fault != nil {
		undo("the simulator refused it")
		return nil, fault, ""
	}
	return snap, nil, ""
}

// removeSnapshotsQEMU asks hostd to commit each snapshot's delta; it returns the first
// fault, after which the VM needs consolidation.
func (l *lab) removeSnapshotsQEMU(sim *simulator.VirtualMachine, vmName string, refs []types.ManagedObjectReference) *hostdError {
	var first *hostdError
	for _, ref := range refs {
		l.mu.Lock()
		rec, ok := l.snaps[ref.Value]
		id := ""
		if ok {
			id = rec.hostdID
		}
		l.mu.Unlock()
		if id == "" {
			continue
		}
		start := time.Now()
		e := l.hostd.call("/vm/snapshot/remove", hostdCommitTimeout, map[string]string{"vm": vmName, "snapshot": id}, nil)
		if e != nil && e.Fault == "NotFound" { // hostd has no such snapshot: nothing to commit
			log.Printf("snapshot %s of %s: hostd: %s", id, vmName, e.Message)
			e = nil
		}
		if e != nil && first == nil {
			first = e
		}
		log.Printf("snapshot %s of %s removed by hostd in %s (fault: %v)", id, vmName, time.Since(start).Round(time.Millisecond), e)
	}
	if first != nil {
		setConsolidationNeeded(sim, true)
	}
	return first
}

func setConsolidationNeeded(sim *simulator.VirtualMachine, needed bool) {
	simulator.Map.WithLock(sim, func() {
		simulator.Map.Update(sim, []types.PropertyChange{{Name: "runtime.consolidationNeeded", Val: needed}})
	})
}

// ConsolidateVMDisksTask: hostd finishes a commit that failed (for VMs that are not
// QEMU-backed there is nothing to consolidate).
func (s *StillpointVM) ConsolidateVMDisksTask(ctx *simulator.Context, req *types.ConsolidateVMDisks_Task) soap.HasFault {
	sim, ok := simulator.Map.Get(s.vm).(*simulator.VirtualMachine)
	if !ok {
		return &methods.ConsolidateVMDisks_TaskBody{Fault_: notFound(s.vm)}
	}
	lvm := s.lab.ensureLabVM(sim)
	qemu := s.lab.isQEMU(lvm)
	task := newVMTask(sim, "consolidateVMDisksTask")
	go runTaskMsg(task, func() (types.AnyType, types.BaseMethodFault, string) {
		if qemu {
			if e := s.lab.hostd.call("/vm/consolidate", hostdCommitTimeout, vmRequest{VM: lvm.name}, nil); e != nil {
				return nil, e.vimFault(), e.Message
			}
		}
		setConsolidationNeeded(sim, false)
		return nil, nil, ""
	})
	return &methods.ConsolidateVMDisks_TaskBody{Res: &types.ConsolidateVMDisks_TaskResponse{Returnval: task.Self}}
}

// --- CBT --------------------------------------------------------------------------------

type hostdCBTReply struct {
	StartOffset int64      `json:"start_offset"`
	Length      int64      `json:"length"`
	Areas       [][2]int64 `json:"areas"`
}

// queryChangedAreasQEMU: hostd reads the dirty bitmaps between the changeId's snapshot
// and this one. Any hostd fault is a FileFault (ESXi's answer to a changeId it cannot use).
func (l *lab) queryChangedAreasQEMU(lvm *labVM, rec *snapRecord, c *capture, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *soap.Fault) {
	body := map[string]interface{}{
		"vm": lvm.name, "snapshot": rec.hostdID, "key": req.DeviceKey, "start_offset": req.StartOffset,
		"change_id": req.ChangeId, "span_cap": l.cfg.SpanCapBytes,
	}
	var reply hostdCBTReply
	if e := l.hostd.call("/vm/cbt/query", hostdShortTimeout, body, &reply); e != nil {
		return nil, cbtFault(e.Message)
	}
	if reply.StartOffset != req.StartOffset || reply.Length <= 0 || reply.StartOffset+reply.Length > c.capacity {
		msg := fmt.Sprintf("hostd answered [%d, +%d) for a query from %d of a %d-byte disk",
			reply.StartOffset, reply.Length, req.StartOffset, c.capacity)
		log.Printf("cbt query %s: %s", lvm.name, msg)
		return nil, cbtFault(msg)
	}
	info := &types.DiskChangeInfo{StartOffset: reply.StartOffset, Length: reply.Length}
	for _, a := range reply.Areas {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: a[0], Length: a[1]})
	}
	return info, nil
}

// resetCBTQEMU starts a new CBT epoch in hostd: every older changeId becomes a FileFault.
func (l *lab) resetCBTQEMU(lvm *labVM) *hostdError {
	return l.hostd.call("/vm/cbt/reset", hostdShortTimeout, vmRequest{VM: lvm.name}, nil)
}

// --- what the guest agent reports -------------------------------------------------------

type guestReport struct {
	VM           string `json:"vm"`
	IP           string `json:"ip"`
	Hostname     string `json:"hostname"`
	ToolsRunning bool   `json:"tools_running"`
	PoweredOff   bool   `json:"powered_off"` // the VM's QEMU exited by itself (guest shutdown)
}

// serveGuestReport: POST /lab/guest {vm, ip, hostname, tools_running[, powered_off]}
// (lab token or session cookie) sets the VM's guest identity, as VMware Tools would.
func (l *lab) serveGuestReport(mux *http.ServeMux, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	if !l.authorized(mux, r) {
		http.Error(w, "not authenticated", http.StatusUnauthorized)
		return
	}
	var rep guestReport
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		http.Error(w, "bad guest report: "+err.Error(), http.StatusBadRequest)
		return
	}
	if rep.IP != "" && net.ParseIP(rep.IP) == nil {
		http.Error(w, "bad ip", http.StatusBadRequest)
		return
	}
	sim := findVMByName(rep.VM)
	if sim == nil {
		http.Error(w, "no such VM", http.StatusNotFound)
		return
	}
	lvm := l.ensureLabVM(sim)
	if rep.PoweredOff && l.isQEMU(lvm) && l.beginPower(lvm) {
		ctx := taskContext(&simulator.Context{Map: simulator.Map}, &lvm.ref)
		simPower(ctx, sim, false)
		l.endPower(lvm)
		log.Printf("%s: its QEMU exited: powered off", rep.VM)
	}
	simulator.Map.WithLock(sim, func() {
		if sim.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
			clearGuest(sim)
			return
		}
		setGuest(sim, vmConfig{GuestID: sim.Config.GuestId, ToolsRunning: rep.ToolsRunning,
			IP: rep.IP, Hostname: rep.Hostname})
	})
	log.Printf("guest of %s: ip %q hostname %q tools running %v", rep.VM, rep.IP, rep.Hostname, rep.ToolsRunning)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]interface{}{"vm": rep.VM, "ok": true})
}
