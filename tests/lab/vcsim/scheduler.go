// ENTRY: installScheduledTaskManager(model)
// HOOK (optional, set before serving): scheduledActionRoute = func(obj types.ManagedObjectReference, method string) types.ManagedObjectReference { ... }

// vCenter scheduled tasks for the lab simulator (govmomi 0.24.2 has none).
//
// The ScheduledTaskManager named by ServiceContent.scheduledTaskManager creates
// ScheduledTask objects whose `info` the PropertyCollector serves; every change
// goes through Registry.Update so WaitForUpdatesEx sees it. A ticker goroutine
// runs due, enabled tasks. A run invokes the task's MethodAction on its object
// through the same reflection dispatch the simulator uses for SOAP requests,
// wrapped in a real Task (reason TaskReasonSchedule), and posts the
// ScheduledTask*Event sequence vCenter posts.
//
// Times are UTC. Supported schedulers: Once, AfterStartup, Hourly, Daily,
// Weekly (monthly ones are refused with NotSupported).
//
// Locking: a ScheduledTask is guarded by its registry lock; lock order is
// ScheduledTask -> ScheduledTaskManager -> EventManager, and the target
// entity is locked only while no scheduled-task lock is held.

package main

import (
	"context"
	"fmt"
	"log"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// scheduledActionRoute, when set (by main), names the registry object that serves a
// scheduled MethodAction on obj: the lab routes some methods to side objects (front.go)
// and scheduled runs should reach the same code as SOAP calls. Unset: obj itself.
var scheduledActionRoute func(obj types.ManagedObjectReference, method string) types.ManagedObjectReference

// schedTick is how often due tasks are looked for.
const schedTick = 500 * time.Millisecond

// schedTaskWait bounds how long a run waits for a Task returned by its method.
const schedTaskWait = 30 * time.Minute

// scheduledTask is the managed object; running is guarded by its registry lock.
type scheduledTask struct {
	mo.ScheduledTask

	running bool
	// anchor is where recurrent schedules count their intervals from.
	anchor time.Time
}

// scheduledTaskManager is the ScheduledTaskManager managed object.
type scheduledTaskManager struct {
	mo.ScheduledTaskManager

	reg     *simulator.Registry
	root    types.ManagedObjectReference
	started time.Time

	mu    sync.Mutex // guards tasks and seq (innermost lock)
	tasks map[types.ManagedObjectReference]*scheduledTask
	seq   int
}

// installScheduledTaskManager registers the manager in the model's registry
// (simulator.Map after model.Create()) and starts the scheduler goroutine.
func installScheduledTaskManager(model *simulator.Model) *scheduledTaskManager {
	reg := simulator.Map
	si := reg.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
	ref := types.ManagedObjectReference{Type: "ScheduledTaskManager", Value: "ScheduledTaskManager"}
	if si.Content.ScheduledTaskManager != nil {
		ref = *si.Content.ScheduledTaskManager
	} else {
		si.Content.ScheduledTaskManager = &ref // ESX models have none
	}
	m := &scheduledTaskManager{
		reg:     reg,
		root:    si.Content.RootFolder,
		started: time.Now().UTC(),
		tasks:   make(map[types.ManagedObjectReference]*scheduledTask),
	}
	m.Self = ref
	m.Description = schedDescription()
	reg.Put(m)
	go m.loop()
	_ = model // the model's registry is simulator.Map once model.Create() has run
	return m
}

func schedDescription() types.ScheduledTaskDescription {
	elem := func(key, label string) types.BaseElementDescription {
		return &types.ElementDescription{Key: key, Description: types.Description{Label: label, Summary: label}}
	}
	d := types.ScheduledTaskDescription{
		Action: []types.BaseTypeDescription{&types.TypeDescription{
			Key: "MethodAction", Description: types.Description{Label: "Method", Summary: "Invoke a method"}}},
	}
	for _, f := range []string{"Once", "AfterStartup", "Hourly", "Daily", "Weekly"} {
		d.SchedulerInfo = append(d.SchedulerInfo, types.ScheduledTaskDetail{
			TypeDescription: types.TypeDescription{Key: f + "TaskScheduler",
				Description: types.Description{Label: f, Summary: f}},
			Frequency: strings.ToLower(f)})
	}
	for _, s := range []string{"queued", "running", "success", "error"} {
		d.State = append(d.State, elem(s, s))
	}
	for _, s := range []string{"sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"} {
		d.DayOfWeek = append(d.DayOfWeek, elem(s, s))
	}
	for _, s := range []string{"first", "second", "third", "fourth", "last"} {
		d.WeekOfMonth = append(d.WeekOfMonth, elem(s, s))
	}
	return d
}

// ---- schedule arithmetic --------------------------------------------------

func schedDay(t time.Time) time.Time {
	return time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
}

// schedValidate checks a scheduler's fields the way vCenter refuses bad specs.
func schedValidate(s types.BaseTaskScheduler) types.BaseMethodFault {
	bad := func(p string) types.BaseMethodFault { return &types.InvalidArgument{InvalidProperty: p} }
	hm := func(h, m int32) types.BaseMethodFault {
		if h < 0 || h > 23 {
			return bad("scheduler.hour")
		}
		if m < 0 || m > 59 {
			return bad("scheduler.minute")
		}
		return nil
	}
	switch x := s.(type) {
	case nil:
		return bad("scheduler")
	case *types.MonthlyByDayTaskScheduler, *types.MonthlyByWeekdayTaskScheduler:
		return &types.NotSupported{}
	case *types.WeeklyTaskScheduler:
		if !(x.Sunday || x.Monday || x.Tuesday || x.Wednesday || x.Thursday || x.Friday || x.Saturday) {
			return bad("scheduler")
		}
		if x.Interval < 0 {
			return bad("scheduler.interval")
		}
		return hm(x.Hour, x.Minute)
	case *types.DailyTaskScheduler:
		if x.Interval < 0 {
			return bad("scheduler.interval")
		}
		return hm(x.Hour, x.Minute)
	case *types.HourlyTaskScheduler:
		if x.Interval < 0 {
			return bad("scheduler.interval")
		}
		return hm(0, x.Minute)
	case *types.OnceTaskScheduler:
		// runAt unset means "now" (vSphere API).
	case *types.AfterStartupTaskScheduler:
		if x.Minute < 0 {
			return bad("scheduler.minute")
		}
	default:
		return bad("scheduler")
	}
	return nil
}

func schedInterval(i int32) int64 {
	if i < 1 {
		return 1 // vCenter treats an unset interval as "every"
	}
	return int64(i)
}

// schedPeriodic returns first + k*step, the smallest such time strictly after `after`.
func schedPeriodic(first time.Time, step time.Duration, after time.Time) time.Time {
	if first.After(after) {
		return first
	}
	k := after.Sub(first)/step + 1
	return first.Add(k * step)
}

// schedNext computes the next run time strictly after `after` (UTC), or nil.
// anchor is the creation/reconfiguration time (or activeTime when later),
// from which intervals are counted; startup is the simulator's start.
func schedNext(s types.BaseTaskScheduler, anchor, after, startup time.Time) *time.Time {
	base := s.GetTaskScheduler()
	anchor = anchor.UTC()
	if base.ActiveTime != nil && base.ActiveTime.After(anchor) {
		anchor = base.ActiveTime.UTC()
	}
	if after.Before(anchor) {
		after = anchor.Add(-time.Nanosecond) // nothing runs before activeTime
	}
	var next time.Time
	switch x := s.(type) {
	case *types.OnceTaskScheduler:
		next = anchor // runAt unset: run as soon as created
		if x.RunAt != nil {
			next = x.RunAt.UTC()
		}
	case *types.AfterStartupTaskScheduler:
		next = startup.Add(time.Duration(x.Minute) * time.Minute)
		if !next.After(after) {
			return nil // only after the next (simulator) start
		}
	case *types.WeeklyTaskScheduler:
		week0 := schedDay(anchor).AddDate(0, 0, -int(anchor.Weekday())) // Sunday of the anchor's week
		days := [7]bool{x.Sunday, x.Monday, x.Tuesday, x.Wednesday, x.Thursday, x.Friday, x.Saturday}
		every := schedInterval(x.Interval)
		found := false
		for d := schedDay(after); d.Before(schedDay(after).AddDate(0, 0, int(7*every)+8)); d = d.AddDate(0, 0, 1) {
			t := d.Add(time.Duration(x.Hour)*time.Hour + time.Duration(x.Minute)*time.Minute)
			week := int64(d.Sub(week0) / (7 * 24 * time.Hour))
			if days[d.Weekday()] && week%every == 0 && t.After(after) && !t.Before(anchor) {
				next, found = t, true
				break
			}
		}
		if !found {
			return nil
		}
	case *types.DailyTaskScheduler:
		first := schedDay(anchor).Add(time.Duration(x.Hour)*time.Hour + time.Duration(x.Minute)*time.Minute)
		if first.Before(anchor) {
			first = first.AddDate(0, 0, 1)
		}
		next = schedPeriodic(first, time.Duration(schedInterval(x.Interval))*24*time.Hour, after)
	case *types.HourlyTaskScheduler:
		first := anchor.Truncate(time.Hour).Add(time.Duration(x.Minute) * time.Minute)
		if first.Before(anchor) {
			first = first.Add(time.Hour)
		}
		next = schedPeriodic(first, time.Duration(schedInterval(x.Interval))*time.Hour, after)
	default:
		return nil
	}
	if base.ExpireTime != nil && next.After(*base.ExpireTime) {
		return nil
	}
	return &next
}

// ---- property publication and events ---------------------------------------

// schedInfoFields lists the info.* properties and how to read them as
// property-change values (nil pointers become untyped nil).
var schedInfoFields = []struct {
	name string
	get  func(i *types.ScheduledTaskInfo) interface{}
}{
	{"name", func(i *types.ScheduledTaskInfo) interface{} { return i.Name }},
	{"description", func(i *types.ScheduledTaskInfo) interface{} { return i.Description }},
	{"enabled", func(i *types.ScheduledTaskInfo) interface{} { return i.Enabled }},
	{"scheduler", func(i *types.ScheduledTaskInfo) interface{} { return i.Scheduler }},
	{"action", func(i *types.ScheduledTaskInfo) interface{} { return i.Action }},
	{"notification", func(i *types.ScheduledTaskInfo) interface{} { return i.Notification }},
	{"lastModifiedTime", func(i *types.ScheduledTaskInfo) interface{} { return i.LastModifiedTime }},
	{"lastModifiedUser", func(i *types.ScheduledTaskInfo) interface{} { return i.LastModifiedUser }},
	{"nextRunTime", func(i *types.ScheduledTaskInfo) interface{} {
		if i.NextRunTime == nil {
			return nil
		}
		return *i.NextRunTime
	}},
	{"prevRunTime", func(i *types.ScheduledTaskInfo) interface{} {
		if i.PrevRunTime == nil {
			return nil
		}
		return *i.PrevRunTime
	}},
	{"state", func(i *types.ScheduledTaskInfo) interface{} { return i.State }},
	{"error", func(i *types.ScheduledTaskInfo) interface{} {
		if i.Error == nil {
			return nil
		}
		return *i.Error
	}},
	{"result", func(i *types.ScheduledTaskInfo) interface{} { return i.Result }},
	{"progress", func(i *types.ScheduledTaskInfo) interface{} { return i.Progress }},
	{"activeTask", func(i *types.ScheduledTaskInfo) interface{} {
		if i.ActiveTask == nil {
			return nil
		}
		return *i.ActiveTask
	}},
}

// publish sends the info.* properties that differ from old through
// Registry.Update, which feeds every PropertyCollector. Caller holds st's lock.
func (m *scheduledTaskManager) publish(st *scheduledTask, old types.ScheduledTaskInfo) {
	var changes []types.PropertyChange
	for _, f := range schedInfoFields {
		cur := f.get(&st.Info)
		if reflect.DeepEqual(f.get(&old), cur) {
			continue
		}
		changes = append(changes, types.PropertyChange{Name: "info." + f.name, Val: cur})
	}
	if len(changes) > 0 {
		m.reg.Update(st, changes)
	}
}

// schedEventArgs fills the Event's entity arguments so entity-filtered
// EventHistoryCollectors see scheduled-task events of that entity.
func (m *scheduledTaskManager) schedEventArgs(ev *types.Event, ref types.ManagedObjectReference) string {
	obj := m.reg.Get(ref)
	me, ok := obj.(mo.Entity)
	if !ok {
		return ref.Value
	}
	name := me.Entity().Name
	arg := types.EntityEventArgument{Name: name}
	switch ref.Type {
	case "VirtualMachine":
		ev.Vm = &types.VmEventArgument{EntityEventArgument: arg, Vm: ref}
	case "HostSystem":
		ev.Host = &types.HostEventArgument{EntityEventArgument: arg, Host: ref}
	case "ComputeResource", "ClusterComputeResource":
		ev.ComputeResource = &types.ComputeResourceEventArgument{EntityEventArgument: arg, ComputeResource: ref}
	case "Datastore":
		ev.Ds = &types.DatastoreEventArgument{EntityEventArgument: arg, Datastore: ref}
	}
	// Walk up to the datacenter, as vCenter's events carry it.
	for p := me.Entity().Parent; p != nil; {
		pe, ok := m.reg.Get(*p).(mo.Entity)
		if !ok {
			break
		}
		if p.Type == "Datacenter" {
			ev.Datacenter = &types.DatacenterEventArgument{
				EntityEventArgument: types.EntityEventArgument{Name: pe.Entity().Name}, Datacenter: *p}
			break
		}
		p = pe.Entity().Parent
	}
	if ref.Type == "Datacenter" {
		ev.Datacenter = &types.DatacenterEventArgument{EntityEventArgument: arg, Datacenter: ref}
	}
	return name
}

// schedEvent builds the common ScheduledTaskEvent part from a snapshot of info.
func (m *scheduledTaskManager) schedEvent(info *types.ScheduledTaskInfo, format string) types.ScheduledTaskEvent {
	ev := types.ScheduledTaskEvent{
		ScheduledTask: types.ScheduledTaskEventArgument{
			EntityEventArgument: types.EntityEventArgument{Name: info.Name},
			ScheduledTask:       info.ScheduledTask,
		},
	}
	entityName := m.schedEventArgs(&ev.Event, info.Entity)
	ev.Entity = types.ManagedEntityEventArgument{
		EntityEventArgument: types.EntityEventArgument{Name: entityName}, Entity: info.Entity}
	dc := ""
	if ev.Datacenter != nil {
		dc = ev.Datacenter.Name
	}
	ev.FullFormattedMessage = strings.NewReplacer(
		"{task}", info.Name, "{entity}", entityName, "{dc}", dc).Replace(format)
	return ev
}

// post posts events through the EventManager so collectors see them.
func (m *scheduledTaskManager) post(ctx *simulator.Context, events ...types.BaseEvent) {
	em := m.reg.EventManager()
	ctx.WithLock(em, func() {
		for _, e := range events {
			em.PostEvent(ctx, &types.PostEvent{EventToPost: e})
		}
	})
}

// ---- ScheduledTaskManager methods -------------------------------------------

func schedFault(f types.BaseMethodFault) *soap.Fault {
	return simulator.Fault("", f)
}

func schedUser(ctx *simulator.Context) string {
	if ctx.Session != nil && ctx.Session.UserName != "" {
		return ctx.Session.UserName
	}
	return "vcsim"
}

// nameTaken returns another task that already uses name, if any.
func (m *scheduledTaskManager) nameTaken(name string, self types.ManagedObjectReference) *types.ManagedObjectReference {
	m.mu.Lock()
	defer m.mu.Unlock()
	for ref, st := range m.tasks {
		if ref != self && st.Info.Name == name {
			return &ref
		}
	}
	return nil
}

func (m *scheduledTaskManager) checkSpec(spec *types.ScheduledTaskSpec, self types.ManagedObjectReference) types.BaseMethodFault {
	if spec.Name == "" || len(spec.Name) > 256 {
		return &types.InvalidName{Name: spec.Name}
	}
	if other := m.nameTaken(spec.Name, self); other != nil {
		return &types.DuplicateName{Name: spec.Name, Object: *other}
	}
	if f := schedValidate(spec.Scheduler); f != nil {
		return f
	}
	if a, ok := spec.Action.(*types.MethodAction); !ok || a.Name == "" {
		return &types.InvalidArgument{InvalidProperty: "action"}
	}
	return nil
}

func (m *scheduledTaskManager) create(ctx *simulator.Context, obj types.ManagedObjectReference,
	base types.BaseScheduledTaskSpec) (types.ManagedObjectReference, *soap.Fault) {
	if base == nil {
		return obj, schedFault(&types.InvalidArgument{InvalidProperty: "spec"})
	}
	if m.reg.Get(obj) == nil {
		return obj, schedFault(&types.ManagedObjectNotFound{Obj: obj})
	}
	spec := *base.GetScheduledTaskSpec()
	m.mu.Lock()
	m.seq++
	self := types.ManagedObjectReference{Type: "ScheduledTask", Value: fmt.Sprintf("scheduledtask-%d", m.seq)}
	m.mu.Unlock()
	if f := m.checkSpec(&spec, self); f != nil {
		return obj, schedFault(f)
	}
	entity := obj
	if _, ok := m.reg.Get(obj).(mo.Entity); !ok {
		entity = m.root // CreateObjectScheduledTask on a non-entity object
	}
	now := time.Now().UTC()
	st := &scheduledTask{anchor: now}
	st.Self = self
	taskObject := obj
	st.Info = types.ScheduledTaskInfo{
		ScheduledTaskSpec: spec,
		ScheduledTask:     self,
		Entity:            entity,
		LastModifiedTime:  now,
		LastModifiedUser:  schedUser(ctx),
		State:             types.TaskInfoStateQueued,
		TaskObject:        &taskObject,
	}
	st.Info.NextRunTime = schedNext(spec.Scheduler, st.anchor, now, m.started)

	m.mu.Lock()
	m.tasks[self] = st
	m.mu.Unlock()
	m.reg.Put(st)
	ctx.WithLock(m, func() {
		m.ScheduledTask = append(m.ScheduledTask, self)
		m.reg.Update(m, []types.PropertyChange{{Name: "scheduledTask", Val: m.ScheduledTask}})
	})
	info := st.Info
	m.post(ctx, &types.ScheduledTaskCreatedEvent{
		ScheduledTaskEvent: m.schedEvent(&info, "Created task {task} on {entity} in {dc}")})
	return self, nil
}

func (m *scheduledTaskManager) CreateScheduledTask(ctx *simulator.Context, req *types.CreateScheduledTask) soap.HasFault {
	body := new(methods.CreateScheduledTaskBody)
	if _, ok := m.reg.Get(req.Entity).(mo.Entity); !ok {
		body.Fault_ = schedFault(&types.InvalidArgument{InvalidProperty: "entity"})
		return body
	}
	ref, fault := m.create(ctx, req.Entity, req.Spec)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.CreateScheduledTaskResponse{Returnval: ref}
	return body
}

func (m *scheduledTaskManager) CreateObjectScheduledTask(ctx *simulator.Context, req *types.CreateObjectScheduledTask) soap.HasFault {
	body := new(methods.CreateObjectScheduledTaskBody)
	ref, fault := m.create(ctx, req.Obj, req.Spec)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.CreateObjectScheduledTaskResponse{Returnval: ref}
	return body
}

// matching lists, in creation order, the tasks whose field picked by key is ref (all if ref is nil).
func (m *scheduledTaskManager) matching(ref *types.ManagedObjectReference,
	key func(*scheduledTask) types.ManagedObjectReference) []types.ManagedObjectReference {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []types.ManagedObjectReference
	for _, self := range m.ScheduledTask {
		st, ok := m.tasks[self]
		if ok && (ref == nil || key(st) == *ref) {
			out = append(out, self)
		}
	}
	return out
}

func (m *scheduledTaskManager) RetrieveEntityScheduledTask(ctx *simulator.Context, req *types.RetrieveEntityScheduledTask) soap.HasFault {
	// Entity and task object never change after creation, so no task lock is needed.
	return &methods.RetrieveEntityScheduledTaskBody{Res: &types.RetrieveEntityScheduledTaskResponse{
		Returnval: m.matching(req.Entity, func(st *scheduledTask) types.ManagedObjectReference { return st.Info.Entity }),
	}}
}

func (m *scheduledTaskManager) RetrieveObjectScheduledTask(ctx *simulator.Context, req *types.RetrieveObjectScheduledTask) soap.HasFault {
	return &methods.RetrieveObjectScheduledTaskBody{Res: &types.RetrieveObjectScheduledTaskResponse{
		Returnval: m.matching(req.Obj, func(st *scheduledTask) types.ManagedObjectReference { return *st.Info.TaskObject }),
	}}
}

// ---- ScheduledTask methods ---------------------------------------------------

// manager finds the (single) manager; tasks keep no back pointer in the registry.
func (st *scheduledTask) manager() *scheduledTaskManager {
	si := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
	return simulator.Map.Get(*si.Content.ScheduledTaskManager).(*scheduledTaskManager)
}

func (st *scheduledTask) ReconfigureScheduledTask(ctx *simulator.Context, req *types.ReconfigureScheduledTask) soap.HasFault {
	body := new(methods.ReconfigureScheduledTaskBody)
	m := st.manager()
	if st.running {
		body.Fault_ = schedFault(&types.InvalidState{})
		return body
	}
	if req.Spec == nil {
		body.Fault_ = schedFault(&types.InvalidArgument{InvalidProperty: "spec"})
		return body
	}
	spec := *req.Spec.GetScheduledTaskSpec()
	if f := m.checkSpec(&spec, st.Self); f != nil {
		body.Fault_ = schedFault(f)
		return body
	}
	old := st.Info
	now := time.Now().UTC()
	m.mu.Lock() // nameTaken reads Info.Name under m.mu
	st.Info.ScheduledTaskSpec = spec
	m.mu.Unlock()
	st.anchor = now
	st.Info.LastModifiedTime = now
	st.Info.LastModifiedUser = schedUser(ctx)
	st.Info.NextRunTime = schedNext(spec.Scheduler, st.anchor, now, m.started)
	m.publish(st, old)
	info := st.Info
	m.post(ctx, &types.ScheduledTaskReconfiguredEvent{
		ScheduledTaskEvent: m.schedEvent(&info, "Reconfigured task {task} on {entity} in datacenter {dc}")})
	body.Res = new(types.ReconfigureScheduledTaskResponse)
	return body
}

func (st *scheduledTask) RemoveScheduledTask(ctx *simulator.Context, req *types.RemoveScheduledTask) soap.HasFault {
	body := new(methods.RemoveScheduledTaskBody)
	m := st.manager()
	if st.running {
		body.Fault_ = schedFault(&types.InvalidState{})
		return body
	}
	m.mu.Lock()
	delete(m.tasks, st.Self)
	m.mu.Unlock()
	ctx.WithLock(m, func() {
		simulator.RemoveReference(&m.ScheduledTask, st.Self)
		m.reg.Update(m, []types.PropertyChange{{Name: "scheduledTask", Val: m.ScheduledTask}})
	})
	m.reg.Remove(st.Self)
	info := st.Info
	m.post(ctx, &types.ScheduledTaskRemovedEvent{
		ScheduledTaskEvent: m.schedEvent(&info, "Removed task {task} on {entity} in datacenter {dc}")})
	body.Res = new(types.RemoveScheduledTaskResponse)
	return body
}

func (st *scheduledTask) RunScheduledTask(ctx *simulator.Context, req *types.RunScheduledTask) soap.HasFault {
	body := new(methods.RunScheduledTaskBody)
	if st.running {
		body.Fault_ = schedFault(&types.InvalidState{})
		return body
	}
	m := st.manager()
	run := m.begin(st, false) // we hold st's lock (SOAP dispatch)
	go m.finish(st, run)
	body.Res = new(types.RunScheduledTaskResponse)
	return body
}

// ---- running ---------------------------------------------------------------

// schedRun carries one run from begin to finish.
type schedRun struct {
	ctx     *simulator.Context
	action  types.MethodAction
	obj     types.ManagedObjectReference
	task    *simulator.Task         // our Task for a synchronous method; nil for a *_Task method
	info    types.ScheduledTaskInfo // snapshot at start
	started time.Time
}

// loop runs due tasks every schedTick for the life of the process.
func (m *scheduledTaskManager) loop() {
	for range time.Tick(schedTick) {
		m.mu.Lock()
		due := make([]*scheduledTask, 0, len(m.tasks))
		for _, st := range m.tasks {
			due = append(due, st)
		}
		m.mu.Unlock()
		now := time.Now().UTC()
		for _, st := range due {
			var run *schedRun
			m.reg.WithLock(st, func() {
				if m.reg.Get(st.Self) == nil || st.running || st.Info.NextRunTime == nil || st.Info.NextRunTime.After(now) {
					return
				}
				if !st.Info.Enabled {
					// A disabled task skips its slot rather than firing late when enabled.
					old := st.Info
					st.Info.NextRunTime = m.following(st, now)
					m.publish(st, old)
					return
				}
				run = m.begin(st, true)
			})
			if run != nil {
				go m.finish(st, run)
			}
		}
	}
}

// following is the next run after now (nil for a once task that has had its turn).
func (m *scheduledTaskManager) following(st *scheduledTask, now time.Time) *time.Time {
	if _, once := st.Info.Scheduler.(*types.OnceTaskScheduler); once {
		return nil
	}
	return schedNext(st.Info.Scheduler, st.anchor, now, m.started)
}

// begin marks st running and, for a synchronous method, creates the run's Task (an
// asynchronous *_Task method brings its own, which becomes info.activeTask as vCenter
// does). Caller holds st's lock.
func (m *scheduledTaskManager) begin(st *scheduledTask, scheduled bool) *schedRun {
	now := time.Now().UTC()
	old := st.Info
	action, _ := st.Info.Action.(*types.MethodAction)
	run := &schedRun{action: *action, obj: *st.Info.TaskObject, started: now}
	run.ctx = &simulator.Context{Context: context.Background(), Map: m.reg, Session: &simulator.Session{
		UserSession: types.UserSession{Key: uuid.New().String(), UserName: st.Info.LastModifiedUser},
		Registry:    simulator.NewRegistry(),
	}}
	if !strings.HasSuffix(action.Name, "_Task") {
		run.task = simulator.CreateTask(run.obj, action.Name, func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
			res, ref, fault := m.invoke(run.ctx, run.obj, &run.action)
			if ref != nil { // a synchronous-looking method that still returned a Task
				return m.await(*ref)
			}
			return res, fault
		})
		m.adopt(st, run.task.Self)
		st.Info.ActiveTask = &run.task.Self
	}

	st.running = true
	if scheduled || (st.Info.NextRunTime != nil && !st.Info.NextRunTime.After(now)) {
		st.Info.NextRunTime = m.following(st, now)
	}
	st.Info.State = types.TaskInfoStateRunning
	st.Info.Error = nil
	st.Info.Result = nil
	st.Info.Progress = 0
	m.publish(st, old)
	run.info = st.Info
	return run
}

// adopt marks a Task as started by st's schedule (TaskInfo.reason, entity name).
func (m *scheduledTaskManager) adopt(st *scheduledTask, ref types.ManagedObjectReference) {
	task, ok := m.reg.Get(ref).(*simulator.Task)
	if !ok {
		return
	}
	m.reg.WithLock(task, func() {
		task.Info.Reason = &types.TaskReasonSchedule{Name: st.Info.Name, ScheduledTask: st.Self}
		if e, ok := m.reg.Get(*task.Info.Entity).(mo.Entity); ok {
			task.Info.EntityName = e.Entity().Name
		}
	})
}

// finish runs the action outside any scheduled-task lock, then records the outcome.
func (m *scheduledTaskManager) finish(st *scheduledTask, run *schedRun) {
	m.post(run.ctx, &types.ScheduledTaskStartedEvent{
		ScheduledTaskEvent: m.schedEvent(&run.info, "Running task {task} on {entity} in datacenter {dc}")})

	var result types.AnyType
	var fault types.BaseMethodFault
	if run.task != nil {
		run.task.Run() // synchronous: Execute invokes the method
		m.reg.WithLock(run.task, func() {
			result = run.task.Info.Result
			if run.task.Info.Error != nil {
				fault = run.task.Info.Error.Fault
			}
		})
	} else {
		var ref *types.ManagedObjectReference
		result, ref, fault = m.invoke(run.ctx, run.obj, &run.action)
		if ref != nil {
			m.reg.WithLock(st, func() {
				m.adopt(st, *ref)
				old := st.Info
				st.Info.ActiveTask = ref
				m.publish(st, old)
			})
			result, fault = m.await(*ref)
		}
	}

	var reason *types.LocalizedMethodFault
	state := types.TaskInfoStateSuccess
	if fault != nil {
		state = types.TaskInfoStateError
		name := reflect.TypeOf(fault).Elem().Name()
		reason = &types.LocalizedMethodFault{Fault: fault,
			LocalizedMessage: fmt.Sprintf("%s failed: %s", run.action.Name, name)}
		result = nil
	}

	var info types.ScheduledTaskInfo
	m.reg.WithLock(st, func() {
		old := st.Info
		prev := run.started
		st.running = false
		st.Info.State = state
		st.Info.Error = reason
		st.Info.Result = result
		st.Info.PrevRunTime = &prev
		st.Info.ActiveTask = nil
		if state == types.TaskInfoStateSuccess {
			st.Info.Progress = 100
		}
		if m.reg.Get(st.Self) != nil {
			m.publish(st, old)
		}
		info = st.Info
	})

	if reason == nil {
		m.post(run.ctx, &types.ScheduledTaskCompletedEvent{
			ScheduledTaskEvent: m.schedEvent(&info, "Task {task} on {entity} in datacenter {dc} completed successfully")})
		return
	}
	ev := m.schedEvent(&info, "Task {task} on {entity} in datacenter {dc} cannot be completed: "+reason.LocalizedMessage)
	m.post(run.ctx, &types.ScheduledTaskFailedEvent{ScheduledTaskEvent: ev, Reason: *reason})
}

// ---- method invocation ---------------------------------------------------------

// invoke calls action on obj the way the simulator dispatches a SOAP request:
// look the object up in the registry, find the Go method by the SOAP name,
// build the request struct from the positional arguments, call it under the
// object's lock. A Task returned by the method is returned as task, for the
// caller to wait for.
func (m *scheduledTaskManager) invoke(ctx *simulator.Context, obj types.ManagedObjectReference,
	action *types.MethodAction) (result types.AnyType, task *types.ManagedObjectReference, fault types.BaseMethodFault) {
	defer func() {
		if r := recover(); r != nil {
			log.Printf("scheduled task: %s.%s panicked: %v", obj, action.Name, r)
			result, task, fault = nil, nil, &types.SystemError{Reason: fmt.Sprint(r)}
		}
	}()
	notFound := &types.MethodNotFound{Receiver: obj, Method: action.Name}
	target := obj
	if scheduledActionRoute != nil {
		target = scheduledActionRoute(obj, action.Name)
	}
	handler := m.reg.Get(target)
	if handler == nil {
		return nil, nil, &types.ManagedObjectNotFound{Obj: obj}
	}
	// Wire names may start lower case (vmodl "setCustomValue"); Go names never do.
	goName := strings.Title(action.Name)
	reqType, ok := types.TypeFunc()(action.Name)
	if !ok {
		reqType, ok = types.TypeFunc()(goName)
	}
	if !ok || reqType.Kind() != reflect.Struct {
		return nil, nil, notFound
	}
	if strings.HasSuffix(goName, "_Task") {
		goName = strings.TrimSuffix(goName, "_Task") + "Task"
	}
	method := reflect.ValueOf(handler).MethodByName(goName)
	if !method.IsValid() && goName == "Reload" {
		// ManagedEntity.Reload re-reads an entity's state from what backs it; the
		// simulator's state is always current, so on any entity it is a successful no-op
		// (Stillpoint's scheduled tasks on folders use it as their harmless action).
		if _, ok := handler.(mo.Entity); ok {
			return nil, nil, nil
		}
	}
	if !method.IsValid() {
		return nil, nil, notFound
	}
	if e, ok := handler.(mo.Entity); ok {
		for _, dm := range e.Entity().DisabledMethod {
			if dm == goName {
				return nil, nil, &types.MethodDisabled{}
			}
		}
	}
	req := reflect.New(reqType)
	this := req.Elem().FieldByName("This")
	if !this.IsValid() {
		return nil, nil, notFound
	}
	this.Set(reflect.ValueOf(target))
	for i, arg := range action.Argument {
		if i+1 >= reqType.NumField() || !schedAssign(req.Elem().Field(i+1), arg.Value) {
			return nil, nil, &types.InvalidArgument{InvalidProperty: fmt.Sprintf("argument[%d]", i)}
		}
	}
	mt := method.Type()
	if mt.NumIn() < 1 || mt.NumIn() > 2 || mt.In(mt.NumIn()-1) != req.Type() || mt.NumOut() != 1 {
		return nil, nil, notFound
	}
	var args []reflect.Value
	if mt.NumIn() == 2 {
		if mt.In(0) != reflect.TypeOf(ctx) {
			return nil, nil, notFound
		}
		args = append(args, reflect.ValueOf(ctx))
	}
	args = append(args, req)

	caller := target
	ctx.Caller = &caller // so the method's own ctx.WithLock(target) does not deadlock
	var out []reflect.Value
	m.reg.WithLock(handler, func() { out = method.Call(args) })
	ctx.Caller = nil

	res, ok := out[0].Interface().(soap.HasFault)
	if !ok || res == nil {
		return nil, nil, &types.SystemError{Reason: "method returned no response"}
	}
	if f := res.Fault(); f != nil {
		if mf, ok := f.VimFault().(types.BaseMethodFault); ok {
			return nil, nil, mf
		}
		return nil, nil, &types.SystemError{Reason: f.String}
	}
	rv := reflect.ValueOf(res).Elem().FieldByName("Res")
	if !rv.IsValid() || rv.IsNil() {
		return nil, nil, nil
	}
	ret := rv.Elem().FieldByName("Returnval")
	if !ret.IsValid() {
		return nil, nil, nil
	}
	val := ret.Interface()
	if ref, ok := val.(types.ManagedObjectReference); ok && ref.Type == "Task" {
		return nil, &ref, nil
	}
	if ret.Kind() == reflect.Ptr && ret.IsNil() {
		return nil, nil, nil
	}
	return val, nil, nil
}

// await waits for a Task returned by a scheduled method and takes over its outcome.
func (m *scheduledTaskManager) await(ref types.ManagedObjectReference) (types.AnyType, types.BaseMethodFault) {
	deadline := time.Now().Add(schedTaskWait)
	for time.Now().Before(deadline) {
		task, ok := m.reg.Get(ref).(*simulator.Task)
		if !ok {
			return nil, &types.ManagedObjectNotFound{Obj: ref}
		}
		var info types.TaskInfo
		m.reg.WithLock(task, func() { info = task.Info })
		switch info.State {
		case types.TaskInfoStateSuccess:
			return info.Result, nil
		case types.TaskInfoStateError:
			if info.Error != nil {
				return nil, info.Error.Fault
			}
			return nil, &types.SystemError{Reason: "task failed"}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil, &types.Timedout{}
}

// schedAssign stores a decoded MethodActionArgument value in a request field,
// converting between value and pointer forms and from ArrayOfXYZ wrappers.
func schedAssign(field reflect.Value, value types.AnyType) bool {
	if value == nil {
		return true // unset optional argument
	}
	v := reflect.ValueOf(value)
	ft := field.Type()
	try := func(v reflect.Value) bool {
		switch {
		case v.Type().AssignableTo(ft):
			field.Set(v)
		case ft.Kind() == reflect.Ptr && v.Type().AssignableTo(ft.Elem()):
			p := reflect.New(ft.Elem())
			p.Elem().Set(v)
			field.Set(p)
		case v.Kind() == reflect.Ptr && !v.IsNil() && v.Elem().Type().AssignableTo(ft):
			field.Set(v.Elem())
		case ft.Kind() == reflect.Interface && reflect.PtrTo(v.Type()).Implements(ft):
			p := reflect.New(v.Type())
			p.Elem().Set(v)
			field.Set(p)
		case schedScalar(v.Kind()) == schedScalar(ft.Kind()) && schedScalar(ft.Kind()) != "" && v.Type().ConvertibleTo(ft):
			field.Set(v.Convert(ft)) // e.g. xsd:long from pyVmomi into an int32 parameter
		default:
			return false
		}
		return true
	}
	if try(v) {
		return true
	}
	// ArrayOfString and friends wrap a single slice field.
	if ft.Kind() == reflect.Slice {
		if v.Kind() == reflect.Ptr && !v.IsNil() {
			v = v.Elem()
		}
		if v.Kind() == reflect.Struct && v.NumField() == 1 && v.Field(0).Kind() == reflect.Slice {
			return try(v.Field(0))
		}
	}
	return false
}

// schedScalar groups kinds that convert into each other without surprise.
func schedScalar(k reflect.Kind) string {
	switch k {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "int"
	case reflect.Float32, reflect.Float64:
		return "float"
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "bool"
	}
	return ""
}
