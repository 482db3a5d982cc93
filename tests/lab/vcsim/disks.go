package main

// Disk files: sparse flat files with ESXi-style descriptors, point-in-time captures
// (FICLONE reflink, else a sparse copy) and the per-64KiB-block content map of a capture
// that Changed Block Tracking compares.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const blockSize = 64 * 1024

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
	ficlone  = 0x40049409
)

var zeroBlock = make([]byte, blockSize)
var zeroHash = blockHash(zeroBlock)

type hash16 [16]byte

func blockHash(b []byte) hash16 {
	sum := sha256.Sum256(b)
	var h hash16
	copy(h[:], sum[:16])
	return h
}

// blockMap is the content of one capture, block by block: what QueryChangedDiskAreas
// compares, kept after the capture files are deleted.
type blockMap struct {
	size   int64
	hashes []hash16
	alloc  []bool // the block holds data (not entirely a hole)
}

func (m *blockMap) blocks() int64 { return int64(len(m.hashes)) }

// flatPath maps a descriptor path ("x.vmdk") to its flat extent ("x-flat.vmdk").
func flatPath(descriptor string) string {
	return strings.TrimSuffix(descriptor, ".vmdk") + "-flat.vmdk"
}

// datastoreFile resolves "[LocalDS_0] dir/x.vmdk" to an absolute path in the datastore.
func (l *lab) datastoreFile(dsPath string) (string, error) {
	i := strings.Index(dsPath, "]")
	if !strings.HasPrefix(dsPath, "[") || i < 0 {
		return "", fmt.Errorf("bad datastore path %q", dsPath)
	}
	ds, rel := dsPath[1:i], strings.TrimSpace(dsPath[i+1:])
	if ds != datastoreName {
		return "", fmt.Errorf("unknown datastore %q", ds)
	}
	abs := filepath.Join(l.cfg.DatastoreDir, filepath.Clean("/"+rel))
	return abs, nil
}

func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}

// writeDescriptor writes an ESXi-like monolithic-flat ("vmfs") descriptor.
func writeDescriptor(path string, capacity int64) error {
	sectors := capacity / 512
	cylinders := sectors / (255 * 63)
	if cylinders > 65535 {
		cylinders = 65535
	}
	text := fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%s
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s"

# The Disk Data Base
#DDB

ddb.adapterType = "pvscsi"
ddb.geometry.cylinders = "%d"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "%s"
ddb.thinProvisioned = "1"
ddb.uuid = "60 00 C2 9%s"
ddb.virtualHWVersion = "13"
`, randomHex(4), sectors, filepath.Base(flatPath(path)), cylinders, randomHex(16), randomHex(1)[:1])
	return os.WriteFile(path, []byte(text), 0o600)
}

// reconcileDisks makes every disk of the VM a real sparse flat file of its capacity plus a
// descriptor (the simulator itself creates empty files). Caller holds the VM's lock.
func (l *lab) reconcileDisks(vm *simulator.VirtualMachine) ([]readyDisk, error) {
	var out []readyDisk
	for _, dev := range vm.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		desc, err := l.datastoreFile(backing.FileName)
		if err != nil {
			return nil, err
		}
		capacity := diskCapacity(disk)
		flat := flatPath(desc)
		if err := os.MkdirAll(filepath.Dir(desc), 0o700); err != nil {
			return nil, err
		}
		st, err := os.Stat(flat)
		if errors.Is(err, os.ErrNotExist) || (err == nil && st.Size() < capacity) {
			f, err := os.OpenFile(flat, os.O_CREATE|os.O_WRONLY, 0o600)
			if err != nil {
				return nil, err
			}
			err = f.Truncate(capacity)
			_ = f.Close()
			if err != nil {
				return nil, err
			}
		} else if err != nil {
			return nil, err
		}
		if st, err := os.Stat(desc); err != nil || st.Size() == 0 {
			if err := writeDescriptor(desc, capacity); err != nil {
				return nil, err
			}
		}
		label := ""
		if disk.DeviceInfo != nil {
			label = disk.DeviceInfo.GetDescription().Label
		}
		out = append(out, readyDisk{
			Key: disk.Key, Label: label, CapacityBytes: capacity,
			DatastorePath: backing.FileName, FlatFile: flat,
		})
	}
	return out, nil
}

// dataExtents returns the [start, end) ranges holding data, by SEEK_DATA/SEEK_HOLE.
func dataExtents(f *os.File, size int64) ([][2]int64, error) {
	var out [][2]int64
	fd := int(f.Fd())
	off := int64(0)
	for off < size {
		start, err := syscall.Seek(fd, off, seekData)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break // no data after off
			}
			if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EOPNOTSUPP) {
				return [][2]int64{{0, size}}, nil // no sparse support: all data
			}
			return nil, err
		}
		if start >= size {
			break
		}
		end, err := syscall.Seek(fd, start, seekHole)
		if err != nil {
			return nil, err
		}
		if end > size {
			end = size
		}
		out = append(out, [2]int64{start, end})
		off = end
	}
	return out, nil
}

// touchedBlocks lists the 64 KiB block numbers that overlap the extents, in order.
func touchedBlocks(extents [][2]int64) []int64 {
	var out []int64
	last := int64(-1)
	for _, e := range extents {
		for b := e[0] / blockSize; b*blockSize < e[1]; b++ {
			if b > last {
				out = append(out, b)
				last = b
			}
		}
	}
	return out
}

func readBlock(f *os.File, b int64, buf []byte) error {
	n, err := f.ReadAt(buf, b*blockSize)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	for i := n; i < len(buf); i++ {
		buf[i] = 0
	}
	return nil
}

// scanBlocks builds the block map of a (stable) file, reading only its data extents.
func scanBlocks(path string, size int64) (*blockMap, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n := (size + blockSize - 1) / blockSize
	m := &blockMap{size: size, hashes: make([]hash16, n), alloc: make([]bool, n)}
	for i := range m.hashes {
		m.hashes[i] = zeroHash
	}
	extents, err := dataExtents(f, size)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, blockSize)
	for _, b := range touchedBlocks(extents) {
		if b >= n {
			break
		}
		if err := readBlock(f, b, buf); err != nil {
			return nil, err
		}
		m.alloc[b] = true
		m.hashes[b] = blockHash(buf)
	}
	return m, nil
}

// captureDisk copies src to a new file dst as it is now: a reflink where the file system
// supports it, else a sparse copy (only data blocks, zero blocks left as holes). Only this
// runs between the capture hooks; the block map is computed from dst afterwards.
func captureDisk(src, dst string, size int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, out.Fd(), ficlone, in.Fd())
	if errno != 0 {
		err = sparseCopy(in, out, size)
	}
	if err == nil {
		err = out.Truncate(size)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(dst)
	}
	return err
}

func sparseCopy(in, out *os.File, size int64) error {
	extents, err := dataExtents(in, size)
	if err != nil {
		return err
	}
	buf := make([]byte, blockSize)
	for _, b := range touchedBlocks(extents) {
		if b*blockSize >= size {
			break
		}
		if err := readBlock(in, b, buf); err != nil {
			return err
		}
		if bytes.Equal(buf, zeroBlock) {
			continue
		}
		n := int64(blockSize)
		if rest := size - b*blockSize; rest < n {
			n = rest
		}
		if _, err := out.WriteAt(buf[:n], b*blockSize); err != nil {
			return err
		}
	}
	return nil
}
