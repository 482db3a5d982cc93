package main

// Folder.CreateVM_Task as vCenter takes it: the name is stored escaped ("/" as %2f, "\" as
// %5c, "%" as %25 unless it starts an escape), at most 80 characters, and a config the
// 0.24.2 simulator would panic on (a name it cannot make a directory of, a datastore that
// does not exist: nil dereferences in the task's goroutine, which end the whole process)
// is refused with a fault instead.

import (
	"regexp"
	"strings"
	"unicode/utf8"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const sideFolderType = "StillpointFolder"

const maxEntityName = 80 // vCenter's limit for a VM's name

var escapeSeq = regexp.MustCompile(`^%[0-9A-Fa-f]{2}`)

// StillpointFolder receives CreateVM_Task for its folder (see front.go).
type StillpointFolder struct {
	SideObject
	folder types.ManagedObjectReference
}

// escapeEntityName stores a name as vCenter does.
func escapeEntityName(name string) string {
	var b strings.Builder
	for i := 0; i < len(name); i++ {
		switch c := name[i]; {
		case c == '/':
			b.WriteString("%2f")
		case c == '\\':
			b.WriteString("%5c")
		case c == '%' && !escapeSeq.MatchString(name[i:]):
			b.WriteString("%25")
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// createVMProblem says why the simulator must not run this CreateVM ("" when it may).
func createVMProblem(spec *types.VirtualMachineConfigSpec) types.BaseMethodFault {
	name := spec.Name
	if strings.TrimSpace(name) == "" || !utf8.ValidString(name) || utf8.RuneCountInString(name) > maxEntityName ||
		len(name) > 200 || strings.ContainsAny(name, "\x00\n\r") {
		return &types.InvalidName{Name: name}
	}
	if spec.Files == nil || spec.Files.VmPathName == "" {
		return &types.InvalidArgument{InvalidProperty: "configSpec.files.vmPathName"}
	}
	var p object.DatastorePath
	if !p.FromString(spec.Files.VmPathName) {
		return &types.InvalidArgument{InvalidProperty: "configSpec.files.vmPathName"}
	}
	dc, ok := simulator.Map.Any("Datacenter").(*simulator.Datacenter)
	if !ok || simulator.Map.FindByName(p.Datastore, dc.Datastore) == nil {
		return &types.InvalidDatastore{Name: p.Datastore}
	}
	return nil
}

func (s *StillpointFolder) CreateVMTask(ctx *simulator.Context, req *types.CreateVM_Task) soap.HasFault {
	f, ok := simulator.Map.Get(s.folder).(*simulator.Folder)
	if !ok {
		return &methods.CreateVM_TaskBody{Fault_: notFound(s.folder)}
	}
	req.This = s.folder
	req.Config.Name = escapeEntityName(req.Config.Name)
	if fault := createVMProblem(&req.Config); fault != nil {
		return &methods.CreateVM_TaskBody{Fault_: simulator.Fault("", fault)}
	}
	// Not under the folder's lock: the task takes it when it adds the VM.
	return f.CreateVMTask(ctx, req)
}
