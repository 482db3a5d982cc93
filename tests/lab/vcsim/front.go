package main

// The HTTP handler in front of the simulator's mux:
//   - /sdk: routes the SOAP calls we implement to our side objects by rewriting `_this`'s
//     type attribute, and after calls that create or change VMs makes their disks real files
//     and follows their CBT switch before the reply leaves;
//   - /folder/ (and the simulator's /nfc/, /guestFile/): only with a valid session cookie;
//   - /lab/knobs, /lab/guestinfo/<vm>/<key> and /lab/guest (hostd.go): the lab's own endpoints.

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// <Method ...><_this type="T">value</_this>, the method element optionally prefixed.
var thisRE = regexp.MustCompile(`<(?:[A-Za-z_][\w.-]*:)?([A-Za-z_]\w*)(?:\s[^>]*)?>\s*<(?:[A-Za-z_][\w.-]*:)?_this(\s[^>]*?)type="(\w+)"([^>]*)>([^<]*)<`)

// methods routed to side objects: method -> (receiver type -> side type)
var routed = map[string][2]string{
	"CreateSnapshot_Task":     {"VirtualMachine", sideVMType},
	"RemoveAllSnapshots_Task": {"VirtualMachine", sideVMType},
	"QueryChangedDiskAreas":   {"VirtualMachine", sideVMType},
	"RemoveSnapshot_Task":     {"VirtualMachineSnapshot", sideSnapshotType},
	"RevertToSnapshot_Task":   {"VirtualMachineSnapshot", sideSnapshotType},
	// hostd runs QEMU-backed VMs; the others are passed on to the simulator (hostd.go)
	"PowerOnVM_Task":              {"VirtualMachine", sideVMType},
	"PowerOffVM_Task":             {"VirtualMachine", sideVMType},
	"ResetVM_Task":                {"VirtualMachine", sideVMType},
	"Destroy_Task":                {"VirtualMachine", sideVMType},
	"ConsolidateVMDisks_Task":     {"VirtualMachine", sideVMType},
	"LogUserEvent":                {"EventManager", sideEventManagerType},
	"CreateCollectorForEvents":    {"EventManager", sideEventManagerType},
	"QueryEvents":                 {"EventManager", sideEventManagerType},
	"PostEvent":                   {"EventManager", sideEventManagerType},
	"SetCollectorPageSize":        {"EventHistoryCollector", sideCollectorType},
	"LoginByToken":                {"SessionManager", sideSessionManagerType},
	"LoginExtensionByCertificate": {"SessionManager", sideSessionManagerType},
	"CreateVM_Task":               {"Folder", sideFolderType},
	"ImportVApp":                  {"ResourcePool", sidePoolType},
	"HttpNfcLeaseComplete":        {"HttpNfcLease", sideLeaseType},
	"HttpNfcLeaseAbort":           {"HttpNfcLease", sideLeaseType},
}

// methods after which VM disks and CBT state are reconciled
var vmChanging = map[string]bool{
	"CreateVM_Task": true, "ReconfigVM_Task": true, "CloneVM_Task": true,
	"RelocateVM_Task": true, "RegisterVM_Task": true, "ImportVApp": true,
}

const sessionCacheTTL = 10 * time.Second

func (l *lab) frontHandler(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case (r.URL.Path == l.sdkPath || r.URL.Path == l.sdkPath+"/vimService") && r.Method == http.MethodPost:
			l.serveSDK(mux, w, r)
		case strings.HasPrefix(r.URL.Path, "/folder/"), strings.HasPrefix(r.URL.Path, "/nfc/"),
			strings.HasPrefix(r.URL.Path, "/guestFile/"):
			if !l.authorized(mux, r) {
				http.Error(w, "not authenticated", http.StatusUnauthorized)
				return
			}
			if strings.HasPrefix(r.URL.Path, "/folder/") && l.refuseDiskData(w, r) {
				return
			}
			if r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/folder/") {
				l.servePut(w, r)
				return
			}
			mux.ServeHTTP(w, r)
		case strings.HasPrefix(r.URL.Path, nfcPath): // the lease id is the ticket, as on ESXi
			l.serveNFC(w, r)
		case r.URL.Path == "/lab/knobs":
			l.serveKnobs(mux, w, r)
		case strings.HasPrefix(r.URL.Path, "/lab/guestinfo/"):
			l.serveGuestinfo(w, r)
		case r.URL.Path == "/lab/guest":
			l.serveGuestReport(mux, w, r)
		default:
			mux.ServeHTTP(w, r)
		}
	})
}

func (l *lab) serveSDK(mux *http.ServeMux, w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	_ = r.Body.Close()
	if err != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	method := ""
	if m := thisRE.FindSubmatchIndex(body); m != nil {
		method = string(body[m[2]:m[3]])
		thisType := string(body[m[6]:m[7]])
		thisValue := strings.TrimSpace(string(body[m[10]:m[11]]))
		if route, ok := routed[method]; ok && route[0] == thisType && l.ensureSide(thisType, thisValue) {
			body = append(append(append([]byte{}, body[:m[6]]...), route[1]...), body[m[7]:]...)
		}
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	if method == "Fetch" {
		l.serveFetch(mux, w, r)
		return
	}
	if !vmChanging[method] {
		mux.ServeHTTP(w, r)
		return
	}
	// The simulator runs these tasks to completion inside the call: fix the disks before
	// the client can see the task finished.
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, r)
	l.reconcileAll()
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// ensureSide makes sure the side object for a routed call exists.
func (l *lab) ensureSide(typ, value string) bool {
	ref := types.ManagedObjectReference{Type: typ, Value: value}
	switch obj := simulator.Map.Get(ref).(type) {
	case *simulator.VirtualMachine:
		l.ensureLabVM(obj)
		return true
	case *simulator.VirtualMachineSnapshot, *simulator.EventManager, *simulator.SessionManager:
		return simulator.Map.Get(sideRef(ref)) != nil
	case *simulator.ResourcePool: // made on first use, as for folders
		if side := sideRef(ref); simulator.Map.Get(side) == nil {
			simulator.Map.Put(&StillpointResourcePool{SideObject: newSideObject(side), pool: obj.Self})
		}
		return true
	case *simulator.Folder: // folders come and go: the side object is made on first use
		if side := sideRef(ref); simulator.Map.Get(side) == nil {
			simulator.Map.Put(&StillpointFolder{SideObject: newSideObject(side), folder: obj.Self})
		}
		return true
	}
	if typ == "HttpNfcLease" { // session-scoped; only ours (ImportVApp) are routed
		if _, ours := nfcImports.Load(value); !ours {
			return false
		}
		side := sideRef(ref)
		if simulator.Map.Get(side) == nil {
			simulator.Map.Put(&StillpointHttpNfcLease{SideObject: newSideObject(side)})
		}
		return true
	}
	if typ == "EventHistoryCollector" { // session-scoped: not in the global registry
		side := sideRef(ref)
		if simulator.Map.Get(side) == nil {
			simulator.Map.Put(&StillpointEventHistoryCollector{SideObject: newSideObject(side)})
		}
		return true
	}
	return false
}

// reconcileAll gives every VM real disk files and follows its CBT switch.
func (l *lab) reconcileAll() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		lvm := l.ensureLabVM(vm)
		var on bool
		simulator.Map.WithLock(vm, func() {
			if _, err := l.reconcileDisks(vm); err != nil {
				log.Printf("reconcile disks of %s: %v", vm.Name, err)
			}
			on = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		})
		l.mu.Lock()
		l.syncCBT(lvm, on)
		switched := lvm.qemu && l.hostd != nil && lvm.cbtOn && !on
		lvm.cbtOn = on
		l.mu.Unlock()
		if switched { // CBT off: every changeId so far is void (ESXi drops the -ctk files)
			if e := l.resetCBTQEMU(lvm); e != nil {
				log.Printf("CBT of %s switched off: hostd reset: %v", lvm.name, e)
			}
		}
	}
}

// authorized: a valid vSphere session cookie, or the lab token in X-Lab-Token.
func (l *lab) authorized(mux *http.ServeMux, r *http.Request) bool {
	if tok := r.Header.Get("X-Lab-Token"); tok != "" && l.cfg.labToken != "" {
		return subtle.ConstantTimeCompare([]byte(tok), []byte(l.cfg.labToken)) == 1
	}
	cookie, err := r.Cookie(soap.SessionCookieName)
	if err != nil || cookie.Value == "" {
		return false
	}
	l.mu.Lock()
	seen, ok := l.sessions[cookie.Value]
	l.mu.Unlock()
	if ok && time.Since(seen) < sessionCacheTTL {
		return true
	}
	// Ask the simulator itself: CurrentTime needs an authenticated session.
	probe := `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime></soapenv:Body></soapenv:Envelope>`
	req := httptest.NewRequest(http.MethodPost, l.sdkPath, strings.NewReader(probe))
	req.AddCookie(&http.Cookie{Name: soap.SessionCookieName, Value: cookie.Value})
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		return false
	}
	l.mu.Lock()
	l.sessions[cookie.Value] = time.Now()
	l.mu.Unlock()
	return true
}

type knobRequest struct {
	VM             string   `json:"vm"`
	SnapshotDelayS *float64 `json:"snapshot_delay_s"`
	SnapshotFail   *bool    `json:"snapshot_fail"`
	CBTReset       bool     `json:"cbt_reset"`
}

func (l *lab) serveKnobs(mux *http.ServeMux, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	if !l.authorized(mux, r) {
		http.Error(w, "not authenticated", http.StatusUnauthorized)
		return
	}
	var req knobRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		http.Error(w, "bad knobs: "+err.Error(), http.StatusBadRequest)
		return
	}
	vm := findVMByName(req.VM)
	if vm == nil {
		http.Error(w, "no such VM", http.StatusNotFound)
		return
	}
	if req.SnapshotDelayS != nil && (*req.SnapshotDelayS < 0 || *req.SnapshotDelayS > 3600) {
		http.Error(w, "snapshot_delay_s out of range", http.StatusBadRequest)
		return
	}
	lvm := l.ensureLabVM(vm)
	if req.CBTReset && l.isQEMU(lvm) {
		if e := l.resetCBTQEMU(lvm); e != nil {
			http.Error(w, "cbt_reset: "+e.Error(), http.StatusBadGateway)
			return
		}
		req.CBTReset = false
		log.Printf("knobs for %s: CBT reset by hostd", req.VM)
	}
	l.mu.Lock()
	if req.SnapshotDelayS != nil {
		lvm.knobs.SnapshotDelay = time.Duration(*req.SnapshotDelayS * float64(time.Second))
	}
	if req.SnapshotFail != nil {
		lvm.knobs.SnapshotFail = *req.SnapshotFail
	}
	if req.CBTReset {
		l.resetCBT(lvm)
	}
	out := map[string]interface{}{
		"vm": req.VM, "snapshot_delay_s": lvm.knobs.SnapshotDelay.Seconds(),
		"snapshot_fail": lvm.knobs.SnapshotFail,
	}
	l.mu.Unlock()
	log.Printf("knobs for %s: %v (cbt_reset=%v)", req.VM, out, req.CBTReset)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

// serveGuestinfo answers GET /lab/guestinfo/<vm>/<guestinfo.key> like vmware-rpctool.
func (l *lab) serveGuestinfo(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		http.Error(w, "GET only", http.StatusMethodNotAllowed)
		return
	}
	rest := strings.TrimPrefix(r.URL.Path, "/lab/guestinfo/")
	parts := strings.SplitN(rest, "/", 2)
	if len(parts) != 2 || !strings.HasPrefix(parts[1], "guestinfo.") {
		http.Error(w, "want /lab/guestinfo/<vm>/guestinfo.<key>", http.StatusBadRequest)
		return
	}
	vm := findVMByName(parts[0])
	if vm == nil {
		http.NotFound(w, r)
		return
	}
	var value string
	var found bool
	simulator.Map.WithLock(vm, func() {
		for _, o := range vm.Config.ExtraConfig {
			opt := o.GetOptionValue()
			if opt.Key == parts[1] {
				if s, ok := opt.Value.(string); ok {
					value, found = s, true
				}
			}
		}
	})
	if !found {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = io.WriteString(w, value)
}

// An unset property: what vCenter answers to Fetch (pyVmomi's lazy `vm.snapshot`).
const emptyFetch = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><FetchResponse xmlns="urn:vim25"></FetchResponse></soapenv:Body></soapenv:Envelope>`

// serveFetch works around the 0.24.2 simulator's Fetch, which panics (index out of range)
// when the property is unset, e.g. VirtualMachine.snapshot without snapshots.
func (l *lab) serveFetch(mux *http.ServeMux, w http.ResponseWriter, r *http.Request) {
	rec := httptest.NewRecorder()
	panicked := func() (p bool) {
		defer func() {
			if recover() != nil {
				p = true
			}
		}()
		mux.ServeHTTP(rec, r)
		return false
	}()
	if panicked {
		w.Header().Set("Content-Type", "text/xml; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, emptyFetch)
		return
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// activeLab is the running lab, for in-process dispatch (dispatchTarget).
var activeLab *lab

// dispatchTarget returns the object that serves `method` on obj, as a SOAP call through
// the front handler would reach it: our side object for the routed methods, else the
// registry's object. For in-process callers such as scheduled-task runs (scheduler.go),
// so that e.g. a scheduled CreateSnapshot_Task captures the disks too.
func dispatchTarget(obj types.ManagedObjectReference, method string) mo.Reference {
	if route, ok := routed[method]; ok && route[0] == obj.Type && activeLab != nil &&
		activeLab.ensureSide(obj.Type, obj.Value) {
		if side := simulator.Map.Get(types.ManagedObjectReference{Type: route[1], Value: obj.Value}); side != nil {
			return side
		}
	}
	return simulator.Map.Get(obj)
}
