package main

// Changed Block Tracking, exact: the changed areas between two captures are the 64 KiB
// blocks whose content differs, computed from the block maps recorded at capture time.
// A changeId is "<epoch>/<sequence>"; the epoch (ESXi-style "52 xx ... xx-xx ... xx") only
// changes on a CBT reset, and old-epoch changeIds are then refused like ESXi does.
// QEMU-backed VMs: hostd answers from its dirty bitmaps (queryChangedAreasQEMU, hostd.go).

import (
	"crypto/rand"
	"fmt"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

func newEpoch() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[0] = 0x52
	parts := make([]string, 16)
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02x", x)
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

// syncCBT follows the VM's changeTrackingEnabled: off forgets everything, on starts an
// epoch if there is none. Caller holds l.mu.
func (l *lab) syncCBT(v *labVM, on bool) {
	if !on {
		v.cbtEpoch = ""
		v.changes = map[int32]map[string]*blockMap{}
		return
	}
	if v.cbtEpoch == "" {
		v.cbtEpoch = newEpoch()
		v.changes = map[int32]map[string]*blockMap{}
	}
}

// resetCBT invalidates every changeId of the VM (a new epoch). Caller holds l.mu.
func (l *lab) resetCBT(v *labVM) {
	v.cbtEpoch = ""
	v.changes = map[int32]map[string]*blockMap{}
	v.cbtEpoch = newEpoch()
}

func cbtFault(what string) *soap.Fault {
	return simulator.Fault(what, &types.FileFault{File: what})
}

func (s *StillpointVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	sim, ok := simulator.Map.Get(s.vm).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = notFound(s.vm)
		return body
	}
	if req.Snapshot == nil {
		body.Fault_ = simulator.Fault("snapshot is required", &types.InvalidArgument{InvalidProperty: "snapshot"})
		return body
	}
	var cbtOn bool
	simulator.Map.WithLock(sim, func() {
		cbtOn = sim.Config.ChangeTrackingEnabled != nil && *sim.Config.ChangeTrackingEnabled
	})
	lvm := s.lab.ensureLabVM(sim)
	qemu := s.lab.isQEMU(lvm)

	l := s.lab
	l.mu.Lock()
	locked := true
	defer func() {
		if locked {
			l.mu.Unlock()
		}
	}()
	l.syncCBT(lvm, cbtOn)
	if !cbtOn {
		body.Fault_ = cbtFault("change tracking is not enabled")
		return body
	}
	rec, ok := l.snaps[req.Snapshot.Value]
	if !ok || rec.vm != s.vm.Value {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: *req.Snapshot})
		return body
	}
	c, ok := rec.disks[req.DeviceKey]
	if !ok {
		body.Fault_ = simulator.Fault("no such disk", &types.InvalidArgument{InvalidProperty: "deviceKey"})
		return body
	}
	if qemu {
		if c.changeID == "" {
			body.Fault_ = cbtFault("snapshot was taken without change tracking")
			return body
		}
		if req.StartOffset < 0 || req.StartOffset >= c.capacity {
			body.Fault_ = simulator.Fault("startOffset out of range", &types.InvalidArgument{InvalidProperty: "startOffset"})
			return body
		}
		rec, c := *rec, *c
		l.mu.Unlock() // hostd's answer may take a while: not under the lab's lock
		locked = false
		info, fault := l.queryChangedAreasQEMU(lvm, &rec, &c, req)
		if fault != nil {
			body.Fault_ = fault
			return body
		}
		body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
		return body
	}
	if c.changeID == "" || !strings.HasPrefix(c.changeID, lvm.cbtEpoch+"/") {
		body.Fault_ = cbtFault("snapshot was taken without change tracking (or before a reset)")
		return body
	}
	cur := c.blocks
	if req.StartOffset < 0 || req.StartOffset >= cur.size {
		body.Fault_ = simulator.Fault("startOffset out of range", &types.InvalidArgument{InvalidProperty: "startOffset"})
		return body
	}
	var base *blockMap
	if req.ChangeId != "*" {
		base, ok = lvm.changes[req.DeviceKey][req.ChangeId]
		if !ok {
			body.Fault_ = cbtFault("unknown changeId " + req.ChangeId)
			return body
		}
	}
	length := cur.size - req.StartOffset
	if length > l.cfg.SpanCapBytes {
		length = l.cfg.SpanCapBytes
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: types.DiskChangeInfo{
		StartOffset: req.StartOffset,
		Length:      length,
		ChangedArea: changedAreas(cur, base, req.StartOffset, req.StartOffset+length),
	}}
	return body
}

// changedAreas lists the blocks of cur in [start, end) that differ from base (base nil:
// the allocated blocks), adjacent blocks merged, clipped to the window.
func changedAreas(cur, base *blockMap, start, end int64) []types.DiskChangeExtent {
	var out []types.DiskChangeExtent
	changed := func(b int64) bool {
		if base == nil {
			return cur.alloc[b]
		}
		if b >= base.blocks() {
			return cur.hashes[b] != zeroHash
		}
		return cur.hashes[b] != base.hashes[b]
	}
	for b := start / blockSize; b < cur.blocks() && b*blockSize < end; b++ {
		if !changed(b) {
			continue
		}
		s, e := b*blockSize, (b+1)*blockSize
		if s < start {
			s = start
		}
		if e > end {
			e = end
		}
		if e > cur.size {
			e = cur.size
		}
		if n := len(out); n > 0 && out[n-1].Start+out[n-1].Length == s {
			out[n-1].Length += e - s
		} else {
			out = append(out, types.DiskChangeExtent{Start: s, Length: e - s})
		}
	}
	return out
}
