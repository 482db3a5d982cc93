// Command stillpoint-vcsim is the lab's vCenter: govmomi's vSphere API simulator (0.24.2),
// extended from outside its sources with what the lab needs and the simulator lacks:
// point-in-time snapshot disks, exact QueryChangedDiskAreas, guest identity, lab knobs and
// a guestinfo endpoint for lab guests.
//
// Usage: stillpoint-vcsim <config.json>  (schema: see config.go; secrets never in argv).
//
// Extension technique: the simulator dispatches a SOAP call to the registry object whose
// moref matches the call's `_this`. Replacing a VirtualMachine in the registry with a wrapper
// breaks the property collector and internal type assertions, so instead a side object of
// our own type (StillpointVM, StillpointSnapshot) is registered under the same moref value,
// and a small HTTP handler in front of the simulator rewrites `_this type=` of the calls we
// implement (front.go). The simulator then dispatches to our object and encodes the reply.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds | log.LUTC)
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: stillpoint-vcsim <config.json>")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		log.Printf("fatal: %v", err)
		os.Exit(1)
	}
}

func run(configPath string) error {
	cfg, err := loadConfig(configPath)
	if err != nil {
		return err
	}
	ctx := context.Background()

	// One datacenter (DC0), one cluster (DC0_C0) with one host; no default VMs, and no
	// default datastore: ours lives in the configured directory (LocalDS_0).
	model := simulator.VPX()
	model.Datastore = 0
	model.Machine = 0
	model.Host = 0
	model.ClusterHost = 1
	if err := model.Create(); err != nil {
		return fmt.Errorf("create model: %w", err)
	}

	client, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return fmt.Errorf("in-process client: %w", err)
	}
	installEventManagerSide()
	installSessionManagerSide()
	lab := newLab(cfg)
	activeLab = lab
	if err := lab.buildInventory(ctx, client); err != nil {
		return err
	}

	// --- scheduled tasks (tests/lab/vcsim/scheduler.go, written by another helper) -------
	// SCHEDULER HOOK: installed here, after the model exists and before serving
	// (the entry named by scheduler.go's "// ENTRY:" line).
	installScheduledTaskManager(model)
	// Scheduled runs reach the same side objects as SOAP calls (a scheduled
	// CreateSnapshot_Task captures the disks, runs the hooks, records CBT).
	scheduledActionRoute = func(obj types.ManagedObjectReference, method string) types.ManagedObjectReference {
		if target := dispatchTarget(obj, method); target != nil {
			return target.Reference()
		}
		return obj
	}
	// -----------------------------------------------------------------------------------------

	tlsConfig, err := loadTLS(cfg)
	if err != nil {
		return err
	}
	model.Service.TLS = tlsConfig
	model.Service.Listen = &url.URL{
		Host: cfg.Listen,
		User: url.UserPassword(cfg.User, cfg.password),
	}
	server := model.Service.NewServer()
	defer server.Close()
	// The simulator's mux is only reached through our front handler (SOAP rewrites,
	// /lab endpoints, /folder authentication). Set before any client can connect: the
	// ready file, which announces the port, is written below.
	mux := model.Service.ServeMux
	server.Config.Handler = lab.frontHandler(mux)

	_, portText, err := net.SplitHostPort(server.Listener.Addr().String())
	if err != nil {
		return err
	}
	port, _ := strconv.Atoi(portText)
	// Clients are redirected to this name (e.g. NFC lease URLs): keep it on loopback.
	simulator.Map.SessionManager().ServiceHostName = net.JoinHostPort("127.0.0.1", portText)
	lab.sdkPath = simulator.Map.Path

	if err := lab.writeReady(port); err != nil {
		return err
	}
	log.Printf("serving on %s (pid %d)", server.Listener.Addr(), os.Getpid())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	s := <-sig
	log.Printf("signal %s: stopping", s)
	for deadline := time.Now().Add(5 * time.Second); lab.inflight.Load() > 0; {
		if time.Now().After(deadline) {
			log.Printf("captures still running at exit")
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// writeReady announces the server: port, VM morefs and disk files (atomic rename).
func (l *lab) writeReady(port int) error {
	ready := readyInfo{
		URL:  fmt.Sprintf("https://127.0.0.1:%d/sdk", port),
		Port: port,
		PID:  os.Getpid(),
		VMs:  l.readyVMs,
	}
	data, err := json.MarshalIndent(ready, "", "  ")
	if err != nil {
		return err
	}
	tmp := l.cfg.ReadyFile + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Clean(l.cfg.ReadyFile))
}
