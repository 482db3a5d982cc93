package main

// Unit tests of the simulator extension's pure parts (run by tests/unit/test_vcsim_go.py
// with `go test`, GOPATH mode like the build in stillpoint_lab/vcsim.py).

import (
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/vim25/types"
)

func mapOf(blocks ...string) *blockMap {
	m := &blockMap{size: int64(len(blocks)) * blockSize}
	for _, b := range blocks {
		data := make([]byte, blockSize)
		if b != "" {
			copy(data, b)
		}
		m.hashes = append(m.hashes, blockHash(data))
		m.alloc = append(m.alloc, b != "")
	}
	return m
}

func TestEpochLooksLikeESXi(t *testing.T) {
	e := newEpoch()
	halves := strings.Split(e, "-")
	if len(halves) != 2 || !strings.HasPrefix(e, "52 ") {
		t.Fatalf("epoch %q: want \"52 xx .. xx-xx .. xx\"", e)
	}
	for _, h := range halves {
		if len(strings.Fields(h)) != 8 {
			t.Fatalf("epoch %q: want 8 bytes on each side", e)
		}
	}
	if newEpoch() == e {
		t.Fatal("two epochs are equal")
	}
}

func TestChangedAreasMergeAndClip(t *testing.T) {
	base := mapOf("a", "b", "", "d", "e")
	cur := mapOf("a", "B", "C", "d", "E")
	got := changedAreas(cur, base, 0, cur.size)
	want := []types.DiskChangeExtent{{Start: blockSize, Length: 2 * blockSize},
		{Start: 4 * blockSize, Length: blockSize}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("changed areas %v, want %v", got, want)
	}
	clipped := changedAreas(cur, base, blockSize+100, 2*blockSize+10)
	if len(clipped) != 1 || clipped[0].Start != blockSize+100 || clipped[0].Length != blockSize-90 {
		t.Fatalf("clipped %v", clipped)
	}
	all := changedAreas(cur, nil, 0, cur.size) // "*": the allocated blocks
	if len(all) != 1 || all[0].Start != 0 || all[0].Length != 5*blockSize {
		t.Fatalf("allocated areas %v", all)
	}
}

func TestTouchedBlocksAreOrderedAndUnique(t *testing.T) {
	got := touchedBlocks([][2]int64{{0, 10}, {5, blockSize + 1}, {3 * blockSize, 3*blockSize + 1}})
	if len(got) != 3 || got[0] != 0 || got[1] != 1 || got[2] != 3 {
		t.Fatalf("touched %v", got)
	}
}

func TestPeriodicSchedulesStrictlyAfter(t *testing.T) {
	first := time.Date(2026, 12, 1, 2, 30, 0, 0, time.UTC)
	if got := schedPeriodic(first, time.Hour, first); !got.Equal(first.Add(time.Hour)) {
		t.Fatalf("at the first run itself: %v", got)
	}
	if got := schedPeriodic(first, time.Hour, first.Add(-time.Minute)); !got.Equal(first) {
		t.Fatalf("before the first run: %v", got)
	}
	if schedInterval(0) != 1 || schedInterval(3) != 3 {
		t.Fatal("interval")
	}
}

func TestFlatPathOfADescriptor(t *testing.T) {
	if flatPath("vm/vm_1.vmdk") != "vm/vm_1-flat.vmdk" {
		t.Fatal(flatPath("vm/vm_1.vmdk"))
	}
}

func TestDatastoreDirNameEscapesWhatAPathCannotHold(t *testing.T) {
	for name, want := range map[string]string{
		"lab-vm1":            "lab-vm1",
		"Datenbank Müller 1": "Datenbank Müller 1",
		"slash/name":         "slash%2fname",
		`back\slash 50%`:     "back%5cslash 50%25",
	} {
		if got := datastoreDirName(name); got != want {
			t.Errorf("datastoreDirName(%q) = %q, want %q", name, got, want)
		}
	}
}

func TestEntityNamesAreEscapedAsVCenterStoresThem(t *testing.T) {
	for name, want := range map[string]string{
		"slash/name copy": "slash%2fname copy",
		`a\b`:             "a%5cb",
		"50% off":         "50%25 off",
		"already%2fdone":  "already%2fdone", // an escape sequence stays
		"Müller":          "Müller",
	} {
		if got := escapeEntityName(name); got != want {
			t.Errorf("escapeEntityName(%q) = %q, want %q", name, got, want)
		}
	}
}

func TestCreateVMProblemsAreFaultsNotPanics(t *testing.T) {
	long := strings.Repeat("x", 81)
	for _, spec := range []types.VirtualMachineConfigSpec{
		{Name: ""}, {Name: "  "}, {Name: long}, {Name: "a\nb"},
		{Name: "ok"}, // no vmPathName
		{Name: "ok", Files: &types.VirtualMachineFileInfo{VmPathName: "no brackets"}},
	} {
		if createVMProblem(&spec) == nil {
			t.Errorf("createVMProblem(%+v) = nil, want a fault", spec)
		}
	}
}

func TestOnVSANOnlyDiskDataIsHiddenFromFolder(t *testing.T) {
	for path, hidden := range map[string]bool{
		"/folder/vm/vm-flat.vmdk":           true,
		"/folder/vm/vm_1-000001-delta.vmdk": true,
		"/folder/vm/vm-sesparse.vmdk":       true,
		"/folder/vm/vm.vmdk":                false, // the descriptor is there on vSAN too
		"/folder/vm/vm.vmx":                 false,
	} {
		if got := isDiskData(path); got != hidden {
			t.Errorf("isDiskData(%q) = %v, want %v", path, got, hidden)
		}
	}
}
