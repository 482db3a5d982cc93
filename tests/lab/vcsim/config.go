package main

// The JSON config written by stillpoint_lab/vcsim.py (the schema is documented there too).
// Secrets are never inline: the password and the lab token are read from 0600 files.
//
//	{
//	  "listen": "0.0.0.0:0",                  host:port, port 0 = choose
//	  "tls_cert": "/path/cert.pem", "tls_key": "/path/key.pem",
//	  "user": "administrator@vsphere.local",
//	  "password_file": "/path/password",      0600
//	  "lab_token_file": "/path/lab-token",    0600; X-Lab-Token for /lab/knobs
//	  "datastore_dir": "/path/datastore",     LocalDS_0
//	  "datastore_type": "vsan",               optional: a vSAN-like LocalDS_0 (nfc.go)
//	  "span_cap_bytes": 1073741824,           QueryChangedDiskAreas span per reply (64 KiB multiple)
//	  "ready_file": "/path/ready.json",
//	  "hostd_socket": "/path/hostd.sock",     optional: the lab's host agent (hostd.go); with it,
//	                                          VMs created through the API are QEMU-backed
//	  "vms": [{"name": "lab-vm1", "folder": "prod/db" (optional, below the VM folder),
//	           "guest_id": "debian12_64Guest", "tools_running": true,
//	           "ip": "10.77.0.10", "hostname": "lab-vm1",
//	           "hypervisor": "files",         "files" (default) or "qemu" (needs hostd_socket)
//	           "memory_mib": 1024, "cpus": 2, optional; the simulator's defaults otherwise
//	           "disks": [{"size_bytes": 268435456, "pre": ["argv", "..."], "post": ["..."]}]}]
//	}

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

type diskConfig struct {
	SizeBytes int64    `json:"size_bytes"`
	Pre       []string `json:"pre,omitempty"`
	Post      []string `json:"post,omitempty"`
}

type vmConfig struct {
	Name         string       `json:"name"`
	Folder       string       `json:"folder"` // below the datacenter's VM folder: "prod/db"
	GuestID      string       `json:"guest_id"`
	ToolsRunning bool         `json:"tools_running"`
	IP           string       `json:"ip"`
	Hostname     string       `json:"hostname"`
	Hypervisor   string       `json:"hypervisor"` // "files" (default) or "qemu"
	MemoryMiB    int32        `json:"memory_mib"`
	CPUs         int32        `json:"cpus"`
	Disks        []diskConfig `json:"disks"`
}

const (
	hypervisorFiles = "files"
	hypervisorQEMU  = "qemu"
)

type config struct {
	Listen       string `json:"listen"`
	TLSCert      string `json:"tls_cert"`
	TLSKey       string `json:"tls_key"`
	User         string `json:"user"`
	PasswordFile string `json:"password_file"`
	LabTokenFile string `json:"lab_token_file"`
	DatastoreDir string `json:"datastore_dir"`
	// "" (the simulator's type) or "vsan": no disk data over /folder/ (nfc.go)
	DatastoreType string     `json:"datastore_type"`
	SpanCapBytes  int64      `json:"span_cap_bytes"`
	ReadyFile     string     `json:"ready_file"`
	HostdSocket   string     `json:"hostd_socket"`
	VMs           []vmConfig `json:"vms"`

	password string
	labToken string
}

type readyDisk struct {
	Key           int32  `json:"key"`
	Label         string `json:"label"`
	CapacityBytes int64  `json:"capacity_bytes"`
	DatastorePath string `json:"datastore_path"`
	FlatFile      string `json:"flat_file"`
}

type readyVM struct {
	Moref      string      `json:"moref"`
	Hypervisor string      `json:"hypervisor"`
	Disks      []readyDisk `json:"disks"`
}

type readyInfo struct {
	URL  string             `json:"url"`
	Port int                `json:"port"`
	PID  int                `json:"pid"`
	VMs  map[string]readyVM `json:"vms"`
}

func readSecret(path, what string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", what, err)
	}
	s := strings.TrimRight(string(data), "\r\n")
	if s == "" {
		return "", fmt.Errorf("%s file %s is empty", what, path)
	}
	return s, nil
}

func loadConfig(path string) (*config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	var cfg config
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("parse config %s: %w", path, err)
	}
	if cfg.User == "" || cfg.DatastoreDir == "" || cfg.ReadyFile == "" || cfg.Listen == "" {
		return nil, fmt.Errorf("config %s: listen, user, datastore_dir and ready_file are required", path)
	}
	if cfg.DatastoreType != "" && cfg.DatastoreType != "vsan" {
		return nil, fmt.Errorf("config %s: datastore_type must be \"vsan\" or absent, not %q", path, cfg.DatastoreType)
	}
	if cfg.SpanCapBytes <= 0 {
		cfg.SpanCapBytes = 1 << 30
	}
	if cfg.SpanCapBytes%blockSize != 0 {
		return nil, fmt.Errorf("span_cap_bytes must be a multiple of %d", blockSize)
	}
	if cfg.password, err = readSecret(cfg.PasswordFile, "password"); err != nil {
		return nil, err
	}
	if cfg.LabTokenFile != "" {
		if cfg.labToken, err = readSecret(cfg.LabTokenFile, "lab token"); err != nil {
			return nil, err
		}
	}
	seen := map[string]bool{}
	for i, vm := range cfg.VMs {
		// Spaces and any script are vSphere names; "/" (which vSphere keeps as %2f) and the
		// brackets of datastore paths are not supported by the lab.
		if vm.Name == "" || seen[vm.Name] || strings.ContainsAny(vm.Name, "/[]") ||
			strings.TrimSpace(vm.Name) != vm.Name || len([]rune(vm.Name)) > 80 {
			return nil, fmt.Errorf("config: bad or duplicate VM name %q", vm.Name)
		}
		seen[vm.Name] = true
		switch vm.Hypervisor {
		case "":
			cfg.VMs[i].Hypervisor = hypervisorFiles
		case hypervisorFiles:
		case hypervisorQEMU:
			if cfg.HostdSocket == "" {
				return nil, fmt.Errorf("config: VM %s: hypervisor \"qemu\" needs hostd_socket", vm.Name)
			}
		default:
			return nil, fmt.Errorf("config: VM %s: hypervisor must be \"files\" or \"qemu\", not %q", vm.Name, vm.Hypervisor)
		}
		if vm.MemoryMiB < 0 || vm.CPUs < 0 {
			return nil, fmt.Errorf("config: VM %s: memory_mib and cpus must not be negative", vm.Name)
		}
		for _, d := range vm.Disks {
			// Whole sectors; the last 64 KiB CBT block may be partial (block maps pad it).
			if d.SizeBytes <= 0 || d.SizeBytes%512 != 0 {
				return nil, fmt.Errorf("config: VM %s: disk size must be a positive multiple of 512 bytes", vm.Name)
			}
		}
	}
	return &cfg, nil
}

func loadTLS(cfg *config) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("load TLS certificate: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}
