package main

// EventManager.LogUserEvent, which the 0.24.2 simulator lacks: a GeneralUserEvent on the
// entity, posted through the simulator's own PostEvent so collectors and filters see it.

import (
	"reflect"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const sideEventManagerType = "StillpointEventManager"

// StillpointEventManager receives LogUserEvent (see front.go).
type StillpointEventManager struct {
	SideObject
	em types.ManagedObjectReference
}

func installEventManagerSide() {
	em := simulator.Map.EventManager()
	simulator.Map.Put(&StillpointEventManager{SideObject: newSideObject(sideRef(em.Self)), em: em.Self})
}

func (s *StillpointEventManager) LogUserEvent(ctx *simulator.Context, req *types.LogUserEvent) soap.HasFault {
	body := &methods.LogUserEventBody{}
	obj := simulator.Map.Get(req.Entity)
	entity, ok := obj.(mo.Entity)
	if !ok {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: req.Entity})
		return body
	}
	var name string
	simulator.Map.WithLock(obj, func() { name = entity.Entity().Name })
	event := &types.GeneralUserEvent{
		GeneralEvent: types.GeneralEvent{Message: req.Msg},
		Entity:       &types.ManagedEntityEventArgument{EntityEventArgument: types.EntityEventArgument{Name: name}, Entity: req.Entity},
	}
	ev := event.GetEvent()
	switch req.Entity.Type {
	case "VirtualMachine":
		ev.Vm = &types.VmEventArgument{EntityEventArgument: types.EntityEventArgument{Name: name}, Vm: req.Entity}
	case "HostSystem":
		ev.Host = &types.HostEventArgument{EntityEventArgument: types.EntityEventArgument{Name: name}, Host: req.Entity}
	case "Datacenter":
		ev.Datacenter = &types.DatacenterEventArgument{EntityEventArgument: types.EntityEventArgument{Name: name}, Datacenter: req.Entity}
	}
	ev.FullFormattedMessage = req.Msg
	em := simulator.Map.EventManager()
	inner := *ctx
	inner.Caller = &s.em
	simulator.Map.WithLock(em, func() {
		em.PostEvent(&inner, &types.PostEvent{EventToPost: event})
	})
	body.Res = &types.LogUserEventResponse{}
	return body
}

// maxEventPage is the simulator's event history size (its maxPageSize).
const maxEventPage = 1000

// CreateCollectorForEvents: the 0.24.2 simulator fills a new collector's page with the
// newest event followed by the OLDEST ones when more events match than the page holds.
// With a page as large as the history it is correct (newest first, live updates included),
// so collectors are created with that page size.
func (s *StillpointEventManager) CreateCollectorForEvents(ctx *simulator.Context, req *types.CreateCollectorForEvents) soap.HasFault {
	req.This = s.em
	req.Filter.MaxCount = maxEventPage
	em := simulator.Map.EventManager()
	inner := *ctx
	inner.Caller = &s.em
	var body soap.HasFault
	simulator.Map.WithLock(em, func() { body = em.CreateCollectorForEvents(&inner, req) })
	return body
}

// QueryEvents: every matching event (up to the history size), newest first, as vCenter.
func (s *StillpointEventManager) QueryEvents(ctx *simulator.Context, req *types.QueryEvents) soap.HasFault {
	req.This = s.em
	req.Filter.MaxCount = maxEventPage
	em := simulator.Map.EventManager()
	inner := *ctx
	inner.Caller = &s.em
	var body soap.HasFault
	simulator.Map.WithLock(em, func() { body = em.QueryEvents(&inner, req) })
	return body
}

// PostEvent: as vCenter, a posted event without a formatted message gets one (the
// simulator only formats the event types it has templates for).
func (s *StillpointEventManager) PostEvent(ctx *simulator.Context, req *types.PostEvent) soap.HasFault {
	req.This = s.em
	if req.EventToPost != nil {
		ev := req.EventToPost.GetEvent()
		if ev.FullFormattedMessage == "" {
			if m := reflect.Indirect(reflect.ValueOf(req.EventToPost)).FieldByName("Message"); m.IsValid() && m.Kind() == reflect.String {
				ev.FullFormattedMessage = m.String()
			}
		}
	}
	em := simulator.Map.EventManager()
	inner := *ctx
	inner.Caller = &s.em
	var body soap.HasFault
	simulator.Map.WithLock(em, func() { body = em.PostEvent(&inner, req) })
	return body
}

const sideCollectorType = "StillpointEventHistoryCollector"

// StillpointEventHistoryCollector receives SetCollectorPageSize for event collectors.
type StillpointEventHistoryCollector struct {
	SideObject
}

// SetCollectorPageSize keeps the whole history on the page: the simulator's shrink keeps
// the newest event and the OLDEST ones, and its refill has the ordering bug described at
// CreateCollectorForEvents. A client asking for N gets at least N, newest first.
func (s *StillpointEventHistoryCollector) SetCollectorPageSize(ctx *simulator.Context, req *types.SetCollectorPageSize) soap.HasFault {
	body := &methods.SetCollectorPageSizeBody{}
	real := types.ManagedObjectReference{Type: "EventHistoryCollector", Value: s.Self.Value}
	if ctx.Session == nil || ctx.Session.Get(real) == nil {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: real})
		return body
	}
	if req.MaxCount < 0 || req.MaxCount > maxEventPage {
		body.Fault_ = simulator.Fault("", &types.InvalidArgument{InvalidProperty: "maxCount"})
		return body
	}
	body.Res = &types.SetCollectorPageSizeResponse{}
	return body
}
