package main

// An OVF import as vCenter runs it: ResourcePool.ImportVApp makes the VM and an HttpNfcLease
// whose device URLs take each disk as a streamOptimized VMDK (POST, Content-Type
// application/x-vnd.vmware-streamVmdk). The 0.24.2 simulator's lease discards what is sent;
// ours writes it into the disk's flat file, converted by QEMU's own VMDK reader (`qemu-img
// convert -f vmdk`), so a stream the product makes wrong fails here as it would on ESXi.
// HttpNfcLeaseAbort removes the VM being imported, as vCenter does; HttpNfcLeaseComplete
// leaves it. Lease URLs are on this server, under /lab-nfc/<lease>/<disk-N.vmdk>, with the
// host "*" ("the host you asked"), and need no session (the lease id is the ticket).
//
// A vSAN-like datastore ("datastore_type": "vsan"): summary.type says so, and /folder/ has no
// disk data: the flat extents (and snapshot deltas) are not there to GET, HEAD or PUT, as on
// vSAN, where a disk is an object the descriptor points into. Only the NFC lease writes disks.

import (
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	sidePoolType  = "StillpointResourcePool"
	sideLeaseType = "StillpointHttpNfcLease"
	nfcPath       = "/lab-nfc/"
	streamVmdk    = "application/x-vnd.vmware-streamVmdk"
)

type nfcImport struct {
	vm    types.ManagedObjectReference
	disks map[string]string // device URL name -> "[ds] dir/x.vmdk"
	sizes map[string]int64  // capacity in bytes
}

var nfcImports sync.Map // lease moref value -> *nfcImport

// StillpointResourcePool receives ImportVApp for its pool (front.go routes it).
type StillpointResourcePool struct {
	SideObject
	pool types.ManagedObjectReference
}

// StillpointHttpNfcLease receives HttpNfcLeaseComplete / HttpNfcLeaseAbort.
type StillpointHttpNfcLease struct {
	SideObject
}

func (s *StillpointResourcePool) ImportVApp(ctx *simulator.Context, req *types.ImportVApp) soap.HasFault {
	body := new(methods.ImportVAppBody)
	spec, ok := req.Spec.(*types.VirtualMachineImportSpec)
	if !ok {
		body.Fault_ = simulator.Fault(fmt.Sprintf("%T: not a VirtualMachineImportSpec", req.Spec),
			&types.InvalidArgument{InvalidProperty: "spec"})
		return body
	}
	dc, ok := simulator.Map.Any("Datacenter").(*simulator.Datacenter)
	if !ok {
		body.Fault_ = simulator.Fault("no datacenter", &types.InvalidState{})
		return body
	}
	folderRef := dc.VmFolder
	if req.Folder != nil {
		folderRef = *req.Folder
	}
	folder, ok := simulator.Map.Get(folderRef).(*simulator.Folder)
	if !ok {
		body.Fault_ = notFound(folderRef)
		return body
	}
	config := spec.ConfigSpec
	config.Name = escapeEntityName(config.Name)
	if fault := createVMProblem(&config); fault != nil {
		body.Fault_ = simulator.Fault("", fault)
		return body
	}
	res := folder.CreateVMTask(ctx, &types.CreateVM_Task{This: folderRef, Config: config, Pool: s.pool, Host: req.Host})
	task, ok := simulator.Map.Get(res.(*methods.CreateVM_TaskBody).Res.Returnval).(*simulator.Task)
	if !ok {
		body.Fault_ = simulator.Fault("create task lost", &types.InvalidState{})
		return body
	}
	if task.Info.Error != nil {
		body.Fault_ = simulator.Fault("", task.Info.Error.Fault)
		return body
	}
	vmRef := task.Info.Result.(types.ManagedObjectReference)
	vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = notFound(vmRef)
		return body
	}

	lease := simulator.NewHttpNfcLease(ctx, vmRef)
	ref := lease.Reference()
	lease.Info.Lease = ref
	imp := &nfcImport{vm: vmRef, disks: map[string]string{}, sizes: map[string]int64{}}
	n := 0
	for _, dev := range object.VirtualDeviceList(vm.Config.Hardware.Device).SelectByType((*types.VirtualDisk)(nil)) {
		disk := dev.(*types.VirtualDisk)
		backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		name := fmt.Sprintf("disk-%d.vmdk", n)
		imp.disks[name] = backing.FileName
		imp.sizes[name] = diskCapacity(disk)
		lease.Info.DeviceUrl = append(lease.Info.DeviceUrl, types.HttpNfcLeaseDeviceUrl{
			Key:       fmt.Sprintf("/%s/disk:%d", vmRef.Value, n),
			ImportKey: fmt.Sprintf("/%s/disk:%d", vm.Name, n),
			Url:       "https://*" + nfcPath + url.PathEscape(ref.Value) + "/" + name,
			Disk:      types.NewBool(true),
			TargetId:  name,
		})
		n++
	}
	nfcImports.Store(ref.Value, imp)
	body.Res = &types.ImportVAppResponse{Returnval: ref}
	return body
}

func (s *StillpointHttpNfcLease) HttpNfcLeaseComplete(ctx *simulator.Context, req *types.HttpNfcLeaseComplete) soap.HasFault {
	lease := types.ManagedObjectReference{Type: "HttpNfcLease", Value: req.This.Value}
	nfcImports.Delete(lease.Value)
	ctx.Session.Remove(lease)
	return &methods.HttpNfcLeaseCompleteBody{Res: new(types.HttpNfcLeaseCompleteResponse)}
}

func (s *StillpointHttpNfcLease) HttpNfcLeaseAbort(ctx *simulator.Context, req *types.HttpNfcLeaseAbort) soap.HasFault {
	lease := types.ManagedObjectReference{Type: "HttpNfcLease", Value: req.This.Value}
	if v, ok := nfcImports.LoadAndDelete(lease.Value); ok {
		// vCenter removes what an aborted import made.
		vmRef := v.(*nfcImport).vm
		if side, ok := simulator.Map.Get(sideRef(vmRef)).(*StillpointVM); ok {
			side.DestroyTask(ctx, &types.Destroy_Task{This: vmRef})
		} else if vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); ok {
			simulator.Map.WithLock(vm, func() { vm.DestroyTask(ctx, &types.Destroy_Task{This: vmRef}) })
		}
		log.Printf("nfc lease %s aborted: VM %s removed", lease.Value, vmRef.Value)
	}
	ctx.Session.Remove(lease)
	return &methods.HttpNfcLeaseAbortBody{Res: new(types.HttpNfcLeaseAbortResponse)}
}

// serveNFC writes one uploaded streamOptimized VMDK into the disk's flat file.
func (l *lab) serveNFC(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost && r.Method != http.MethodPut {
		http.Error(w, "POST a streamOptimized VMDK", http.StatusMethodNotAllowed)
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, nfcPath), "/")
	if len(parts) != 2 {
		http.NotFound(w, r)
		return
	}
	v, ok := nfcImports.Load(parts[0])
	if !ok {
		http.Error(w, "no such lease (completed, aborted or never made)", http.StatusNotFound)
		return
	}
	imp := v.(*nfcImport)
	dsPath, ok := imp.disks[parts[1]]
	if !ok {
		http.NotFound(w, r)
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != streamVmdk {
		http.Error(w, fmt.Sprintf("Content-Type %q: a disk takes %s", ct, streamVmdk), http.StatusUnsupportedMediaType)
		return
	}
	desc, err := l.datastoreFile(dsPath)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	flat := flatPath(desc)
	upload := flat + ".nfc-upload"
	converted := flat + ".nfc-raw"
	defer os.Remove(upload)
	defer os.Remove(converted)
	f, err := os.OpenFile(upload, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	n, err := writeSparse(f, r.Body)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Truncate(upload, n)
	}
	if err != nil {
		log.Printf("nfc %s: receiving: %v", parts[1], err)
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	out, err := exec.Command("qemu-img", "convert", "-f", "vmdk", "-O", "raw", "-S", "64k", upload, converted).CombinedOutput()
	if err != nil {
		msg := fmt.Sprintf("not a readable streamOptimized VMDK: %s", strings.TrimSpace(string(out)))
		log.Printf("nfc %s: %s", parts[1], msg)
		http.Error(w, msg, http.StatusBadRequest)
		return
	}
	st, err := os.Stat(converted)
	if err != nil || st.Size() != imp.sizes[parts[1]] {
		got := int64(-1)
		if st != nil {
			got = st.Size()
		}
		msg := fmt.Sprintf("the VMDK holds %d bytes, the disk has %d", got, imp.sizes[parts[1]])
		http.Error(w, msg, http.StatusBadRequest)
		return
	}
	if err := os.Rename(converted, flat); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	log.Printf("nfc %s: %d bytes of VMDK into %s", parts[1], n, filepath.Base(flat))
	w.WriteHeader(http.StatusOK)
}

// --- the vSAN-like datastore ----------------------------------------------------------------

func (l *lab) objectDatastore() bool { return l.cfg.DatastoreType == "vsan" }

// isDiskData: a file that on vSAN is not a file (a disk's data, a snapshot's delta).
func isDiskData(path string) bool {
	return strings.HasSuffix(path, "-flat.vmdk") || strings.HasSuffix(path, "-delta.vmdk") ||
		strings.HasSuffix(path, "-sesparse.vmdk")
}

// refuseDiskData answers a /folder/ request for disk data on the vSAN-like datastore.
func (l *lab) refuseDiskData(w http.ResponseWriter, r *http.Request) bool {
	if !l.objectDatastore() || !isDiskData(r.URL.Path) {
		return false
	}
	http.Error(w, "no such file: on a vsan datastore a disk's data is an object, not a file",
		http.StatusNotFound)
	return true
}

// setDatastoreType gives our datastore the configured summary.type.
func setDatastoreType(ds *simulator.Datastore, kind string) {
	if kind == "" {
		return
	}
	simulator.Map.WithLock(ds, func() { ds.Summary.Type = kind })
}
