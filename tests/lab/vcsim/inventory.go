package main

// The lab's state beside the simulator's registry, and the initial inventory: the local
// datastore in the configured directory and the configured VMs with real sparse disks.
// A VM is QEMU-backed (its power, snapshots and CBT are the lab host agent's, hostd.go)
// when its config says "hypervisor": "qemu", or when it was made through the API (e.g. a
// restore's CreateVM_Task) while the config names a hostd socket.

import (
	"context"
	"fmt"
	"log"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

const datastoreName = "LocalDS_0"

type knobs struct {
	SnapshotDelay time.Duration
	SnapshotFail  bool
}

// labVM is what the lab keeps per VM beside the simulator's object (keyed by moref value).
type labVM struct {
	ref   types.ManagedObjectReference
	name  string
	hooks map[int32]diskConfig // capture hooks by device key (configured VMs only)
	knobs knobs

	// Changed Block Tracking: the epoch is the changeId's UUID part; it changes on a
	// reset (or when CBT is switched off and on). changes[deviceKey][changeId] = blocks.
	cbtEpoch string
	cbtSeq   int
	changes  map[int32]map[string]*blockMap

	captureSeq int // numbers the capture files <disk>-00000N.vmdk

	qemu      bool // QEMU-backed: hostd runs it (hostd.go)
	cbtOn     bool // QEMU-backed: changeTrackingEnabled as last seen (a switch resets hostd's CBT)
	powerBusy bool // QEMU-backed: a power operation is in progress
}

// capture is one disk as a snapshot captured it.
type capture struct {
	descriptor string // absolute paths
	flat       string
	dsPath     string    // "[LocalDS_0] vm/vm-000001.vmdk"
	changeID   string    // "" when CBT was off
	blocks     *blockMap // nil for QEMU-backed VMs (hostd's dirty bitmaps are their CBT)
	external   bool      // QEMU-backed: flat is the frozen base disk, owned by hostd (never deleted here)
	capacity   int64
}

type snapRecord struct {
	vm    string // VM moref value
	disks map[int32]*capture
	vmsn  string // the simulator's <vm>-SnapshotN.vmsn (absolute), deleted with the snapshot

	hostdID string // QEMU-backed: hostd's name of the snapshot ("" for captured snapshots)
}

type lab struct {
	cfg      *config
	sdkPath  string
	readyVMs map[string]readyVM
	hostd    *hostdClient // nil without hostd_socket
	built    bool         // the configured inventory exists: VMs seen from now on came through the API

	// mu guards the maps below and every labVM's fields. Lock order: a simulator object
	// lock (Map.WithLock) may be held when taking mu, never the other way round.
	inflight atomic.Int32 // captures in progress (SIGTERM waits for their post hooks)

	mu       sync.Mutex
	vms      map[string]*labVM
	snaps    map[string]*snapRecord
	sessions map[string]time.Time // session cookie -> last verified
}

func newLab(cfg *config) *lab {
	var hostd *hostdClient
	if cfg.HostdSocket != "" {
		hostd = newHostdClient(cfg.HostdSocket)
	}
	return &lab{
		cfg:      cfg,
		hostd:    hostd,
		readyVMs: map[string]readyVM{},
		vms:      map[string]*labVM{},
		snaps:    map[string]*snapRecord{},
		sessions: map[string]time.Time{},
	}
}

func (l *lab) buildInventory(ctx context.Context, c *vim25.Client) error {
	for _, h := range simulator.Map.All("HostSystem") {
		dss, err := object.NewHostSystem(c, h.Reference()).ConfigManager().DatastoreSystem(ctx)
		if err != nil {
			return err
		}
		if _, err := dss.CreateLocalDatastore(ctx, datastoreName, l.cfg.DatastoreDir); err != nil {
			return fmt.Errorf("create datastore: %w", err)
		}
	}
	dcEntity := simulator.Map.Any("Datacenter")
	folders, err := object.NewDatacenter(c, dcEntity.Reference()).Folders(ctx)
	if err != nil {
		return err
	}
	cluster := simulator.Map.Any("ClusterComputeResource")
	pool, err := object.NewClusterComputeResource(c, cluster.Reference()).ResourcePool(ctx)
	if err != nil {
		return err
	}
	ds := simulator.Map.FindByName(datastoreName, dcEntity.(*simulator.Datacenter).Datastore)
	if ds == nil {
		return fmt.Errorf("datastore %s not found", datastoreName)
	}
	setDatastoreType(ds.(*simulator.Datastore), l.cfg.DatastoreType)
	made := map[string]*object.Folder{"": folders.VmFolder}
	for _, vmc := range l.cfg.VMs {
		folder, err := vmFolder(ctx, made, vmc.Folder)
		if err != nil {
			return fmt.Errorf("folder %q of VM %s: %w", vmc.Folder, vmc.Name, err)
		}
		if err := l.createVM(ctx, c, folder, pool, ds.Reference(), vmc); err != nil {
			return fmt.Errorf("create VM %s: %w", vmc.Name, err)
		}
	}
	l.mu.Lock()
	l.built = true
	l.mu.Unlock()
	return nil
}

// vmFolder is the folder at `rel` below the datacenter's VM folder ("prod/db": two levels;
// names in it are as vSphere shows them), made where missing; `made` caches by path.
func vmFolder(ctx context.Context, made map[string]*object.Folder, rel string) (*object.Folder, error) {
	if f, ok := made[rel]; ok {
		return f, nil
	}
	parentPath, name := "", rel
	if i := strings.LastIndex(rel, "/"); i >= 0 {
		parentPath, name = rel[:i], rel[i+1:]
	}
	if name == "" {
		return nil, fmt.Errorf("empty folder name in %q", rel)
	}
	parent, err := vmFolder(ctx, made, parentPath)
	if err != nil {
		return nil, err
	}
	f, err := parent.CreateFolder(ctx, name)
	if err != nil {
		return nil, err
	}
	made[rel] = f
	return f, nil
}

// datastoreDirName is the VM's directory on the datastore: its name with what a path cannot
// hold escaped as vSphere escapes names ("/" %2f, "\\" %5c, "%" %25).
func datastoreDirName(name string) string {
	return strings.NewReplacer("%", "%25", "/", "%2f", "\\", "%5c").Replace(name)
}

func (l *lab) createVM(ctx context.Context, c *vim25.Client, folder *object.Folder,
	pool *object.ResourcePool, ds types.ManagedObjectReference, vmc vmConfig) error {
	dir := datastoreDirName(vmc.Name)
	spec := types.VirtualMachineConfigSpec{
		Name:    vmc.Name,
		GuestId: vmc.GuestID,
		Files: &types.VirtualMachineFileInfo{
			VmPathName: fmt.Sprintf("[%s] %s/%s.vmx", datastoreName, dir, dir)},
	}
	if vmc.MemoryMiB > 0 {
		spec.MemoryMB = int64(vmc.MemoryMiB)
	}
	if vmc.CPUs > 0 {
		spec.NumCPUs = vmc.CPUs
	}
	qemu := vmc.Hypervisor == hypervisorQEMU
	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return err
	}
	devices = append(devices, scsi)
	for i, d := range vmc.Disks {
		file := dir + ".vmdk"
		if i > 0 {
			file = fmt.Sprintf("%s_%d.vmdk", dir, i)
		}
		disk := devices.CreateDisk(scsi.(types.BaseVirtualController), ds,
			fmt.Sprintf("[%s] %s", datastoreName, path.Join(dir, file)))
		disk.Key = int32(2000 + i) // ESXi numbers SCSI disks from 2000
		disk.DeviceInfo = &types.Description{Label: fmt.Sprintf("Hard disk %d", i+1),
			Summary: fmt.Sprintf("%d KB", d.SizeBytes/1024)}
		disk.CapacityInKB = d.SizeBytes / 1024
		disk.CapacityInBytes = d.SizeBytes
		// Thick-ish flat disk like ESXi's default; the file itself is sparse on the host.
		disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).ThinProvisioned = types.NewBool(false)
		devices = append(devices, disk)
	}
	nic := esx.EthernetCard // a copy; its backing names the "VM Network" portgroup
	nic.Key = 4000
	backing := *nic.Backing.(*types.VirtualEthernetCardNetworkBackingInfo)
	nic.Backing = &backing // the simulator writes into the backing: not the shared global
	devices = append(devices, &nic)
	spec.DeviceChange, err = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	if err != nil {
		return err
	}
	task, err := folder.CreateVM(ctx, spec, pool, nil)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return err
	}
	ref := info.Result.(types.ManagedObjectReference)
	vmObj := object.NewVirtualMachine(c, ref)
	// A QEMU-backed VM starts powered off: its disk is filled after the simulator starts,
	// and PowerOnVM_Task (through the API) boots it.
	if !qemu {
		if t, err := vmObj.PowerOn(ctx); err != nil {
			return err
		} else if err := t.Wait(ctx); err != nil {
			return err
		}
	}

	sim := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	lvm := l.ensureLabVM(sim)
	l.mu.Lock()
	lvm.qemu = qemu
	l.mu.Unlock()
	if qemu { // the guest identity comes from the running guest (POST /lab/guest)
		vmc.ToolsRunning, vmc.IP, vmc.Hostname = false, "", ""
	}
	var disks []readyDisk
	var rerr error
	simulator.Map.WithLock(sim, func() {
		disks, rerr = l.reconcileDisks(sim)
		if rerr != nil {
			return
		}
		setGuest(sim, vmc)
	})
	if rerr != nil {
		return rerr
	}
	l.mu.Lock()
	for i, d := range disks {
		lvm.hooks[d.Key] = vmc.Disks[i]
	}
	l.mu.Unlock()
	l.readyVMs[vmc.Name] = readyVM{Moref: ref.Value, Hypervisor: vmc.Hypervisor, Disks: disks}
	return nil
}

// ensureLabVM registers the lab state and the StillpointVM side object for a VM (also for
// VMs that clients create later, e.g. by a restore). Caller must not hold l.mu.
func (l *lab) ensureLabVM(sim *simulator.VirtualMachine) *labVM {
	var ref types.ManagedObjectReference
	var name string
	simulator.Map.WithLock(sim, func() {
		ref = sim.Self
		name = sim.Name
		if sim.Runtime.ConsolidationNeeded == nil {
			sim.Runtime.ConsolidationNeeded = types.NewBool(false)
		}
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	if v, ok := l.vms[ref.Value]; ok {
		return v
	}
	v := &labVM{ref: ref, name: name, hooks: map[int32]diskConfig{}, changes: map[int32]map[string]*blockMap{},
		qemu: l.built && l.hostd != nil}
	if v.qemu {
		log.Printf("%s (%s): QEMU-backed (made through the API, hostd configured)", name, ref.Value)
	}
	l.vms[ref.Value] = v
	simulator.Map.Put(&StillpointVM{SideObject: newSideObject(sideRef(ref)), lab: l, vm: ref})
	return v
}

// sideTypes maps a simulator type to the type of its side object.
var sideTypes = map[string]string{
	"VirtualMachine":         sideVMType,
	"VirtualMachineSnapshot": sideSnapshotType,
	"EventManager":           sideEventManagerType,
	"EventHistoryCollector":  sideCollectorType,
	"SessionManager":         sideSessionManagerType,
	"Folder":                 sideFolderType,
	"ResourcePool":           sidePoolType,
	"HttpNfcLease":           sideLeaseType,
}

// sideRef is the moref of an object's side object: same value, our type.
func sideRef(ref types.ManagedObjectReference) types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: sideTypes[ref.Type], Value: ref.Value}
}

// setGuest gives the VM the identity of its lab guest. Caller holds the VM's lock.
func setGuest(vm *simulator.VirtualMachine, vmc vmConfig) {
	running := types.VirtualMachineToolsRunningStatusGuestToolsNotRunning
	toolsStatus := types.VirtualMachineToolsStatusToolsNotRunning
	state := "notRunning"
	if vmc.ToolsRunning {
		running = types.VirtualMachineToolsRunningStatusGuestToolsRunning
		toolsStatus = types.VirtualMachineToolsStatusToolsOk
		state = "running"
	}
	var mac string
	var nicKey int32
	for _, d := range vm.Config.Hardware.Device {
		if nic, ok := d.(types.BaseVirtualEthernetCard); ok {
			mac = nic.GetVirtualEthernetCard().MacAddress
			nicKey = nic.GetVirtualEthernetCard().Key
			break
		}
	}
	var net []types.GuestNicInfo
	if vmc.IP != "" {
		net = []types.GuestNicInfo{{
			Network: "VM Network", IpAddress: []string{vmc.IP}, MacAddress: mac,
			Connected: true, DeviceConfigId: nicKey,
		}}
	}
	guest := &types.GuestInfo{
		ToolsStatus:         toolsStatus,
		ToolsVersionStatus2: string(types.VirtualMachineToolsVersionStatusGuestToolsCurrent),
		ToolsRunningStatus:  string(running),
		ToolsVersion:        "12352",
		GuestId:             vmc.GuestID,
		GuestFamily:         vm.Guest.GuestFamily,
		GuestFullName:       vmc.GuestID,
		HostName:            vmc.Hostname,
		IpAddress:           vmc.IP,
		Net:                 net,
		GuestState:          state,
	}
	summary := &types.VirtualMachineGuestSummary{
		GuestId:             vmc.GuestID,
		GuestFullName:       vmc.GuestID,
		ToolsStatus:         toolsStatus,
		ToolsVersionStatus2: guest.ToolsVersionStatus2,
		ToolsRunningStatus:  guest.ToolsRunningStatus,
		HostName:            vmc.Hostname,
		IpAddress:           vmc.IP,
	}
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "guest", Val: guest},
		{Name: "summary.guest", Val: summary},
	})
}

// findVMByName returns the simulator VM with that name, or nil.
func findVMByName(name string) *simulator.VirtualMachine {
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		var n string
		simulator.Map.WithLock(vm, func() { n = vm.Name })
		if n == name {
			return vm
		}
	}
	return nil
}

var _ mo.Reference = (*StillpointVM)(nil)

// SideObject is embedded first in every side object. Simulator code that walks the whole
// registry (SearchIndex.FindByUuid, FindByDnsName, ...) digs the first field down to an mo
// type by reflection and panics without one; it is exported because reflection must read
// it. ExtensibleManagedObject matches none of the types such code looks for.
type SideObject struct {
	mo.ExtensibleManagedObject
}

func newSideObject(ref types.ManagedObjectReference) SideObject {
	return SideObject{mo.ExtensibleManagedObject{Self: ref}}
}
