package main

// PUT /folder/<path>: the simulator writes every byte it receives, so a restored disk of
// zeros becomes fully allocated. This writes the same file sparsely (zero 64 KiB blocks
// are left as holes), which keeps lab disks small and restores fast. Same semantics as the
// simulator's PUT: the file is replaced by the request body.

import (
	"bytes"
	"errors"
	"io"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"strings"
)

// datastoreTarget maps a /folder/ request to a file in our datastore ("" if not ours).
func (l *lab) datastoreTarget(r *http.Request) string {
	q := r.URL.Query()
	if ds := q.Get("dsName"); ds != "" && ds != datastoreName {
		return ""
	}
	if dc := q.Get("dcPath"); dc != "" && strings.Trim(dc, "/") != "DC0" {
		return ""
	}
	rel := strings.TrimPrefix(r.URL.Path, "/folder/")
	if rel == "" || strings.HasSuffix(rel, "/") {
		return ""
	}
	return filepath.Join(l.cfg.DatastoreDir, filepath.Clean("/"+rel))
}

func (l *lab) servePut(w http.ResponseWriter, r *http.Request) {
	target := l.datastoreTarget(r)
	if target == "" {
		http.NotFound(w, r)
		return
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o700); err != nil {
		log.Printf("PUT %s: %v", target, err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		log.Printf("PUT %s: %v", target, err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	n, err := writeSparse(f, r.Body)
	if err == nil {
		err = f.Truncate(n)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		log.Printf("PUT %s: %v", target, err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// writeSparse copies src to f, skipping (not writing) all-zero 64 KiB blocks.
func writeSparse(f *os.File, src io.Reader) (int64, error) {
	buf := make([]byte, blockSize)
	var off int64
	for {
		n, err := io.ReadFull(src, buf)
		if n > 0 {
			if !bytes.Equal(buf[:n], zeroBlock[:n]) {
				if _, werr := f.WriteAt(buf[:n], off); werr != nil {
					return off, werr
				}
			}
			off += int64(n)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return off, nil
		}
		if err != nil {
			return off, err
		}
	}
}
