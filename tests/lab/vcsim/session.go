package main

// Only user + password log in. The 0.24.2 simulator's LoginByToken accepts any SAML
// assertion that names a subject (no signature check) and LoginExtensionByCertificate any
// client certificate: on a server the lab guests can reach, those would bypass the password.

import (
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const sideSessionManagerType = "StillpointSessionManager"

// StillpointSessionManager receives the login methods the lab refuses (see front.go).
type StillpointSessionManager struct {
	SideObject
}

func installSessionManagerSide() {
	sm := simulator.Map.SessionManager()
	simulator.Map.Put(&StillpointSessionManager{SideObject: newSideObject(sideRef(sm.Self))})
}

func refusedLogin() *soap.Fault {
	return simulator.Fault("Login failure: only user and password logins are enabled", &types.InvalidLogin{})
}

func (s *StillpointSessionManager) LoginByToken(req *types.LoginByToken) soap.HasFault {
	return &methods.LoginByTokenBody{Fault_: refusedLogin()}
}

func (s *StillpointSessionManager) LoginExtensionByCertificate(req *types.LoginExtensionByCertificate) soap.HasFault {
	return &methods.LoginExtensionByCertificateBody{Fault_: refusedLogin()}
}
