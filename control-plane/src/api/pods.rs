//! The pod endpoints: create, list, get, delete, start, stop, restart, resize, clone, preset and
//! events.
//! Pods are addressed by name within the caller's active team; another team's pod is a 404.
//! Actions answer 202 with the pod (the work happens in the scheduler and on the node) or 409
//! with the current state when the state machine refuses.

use std::collections::BTreeMap;

use salvo::oapi::ToSchema;
use salvo::oapi::extract::{PathParam, QueryParam};
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::api::responses::Accepted;
use crate::db;
use crate::error::ApiError;
use crate::http::auth::caller;
use crate::http::json;
use crate::http::state::{AppState, app};
use crate::pods::state::Action;
use crate::pods::store::{self, ActOutcome, CloneError, CreateError, NewPod, PodRow};
use crate::pods::validate;
use crate::ratelimit;

/// A pod's resources.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResourcesView {
    pub cpu_millis: i32,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
}

/// A pod.
#[derive(Debug, Serialize, ToSchema)]
pub struct PodView {
    pub id: Uuid,
    pub name: String,
    /// `pending`, `scheduled`, `starting`, `running`, `stopping`, `stopped`, `failed`,
    /// `deleting`, `unknown`.
    pub state: String,
    /// `running`, `stopped` or `deleted`.
    pub desired_state: String,
    /// Why the pod is in its state, when there is something to say.
    pub reason: Option<String>,
    pub generation: i64,
    pub image: String,
    pub runtime: Option<String>,
    pub preset: Option<String>,
    pub plan: String,
    pub region: String,
    pub resources: ResourcesView,
    pub env: BTreeMap<String, String>,
    pub command: Option<Vec<String>>,
    pub http_port: Option<i32>,
    pub restart_policy: String,
    /// The node it runs on, once placed.
    pub node: Option<String>,
    pub ip: Option<String>,
    /// Where the pod answers over HTTP (through the node ingress).
    pub urls: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

fn view(state: &AppState, pod: PodRow) -> PodView {
    let port = match state.config.apps_http_port {
        80 => String::new(),
        port => format!(":{port}"),
    };
    PodView {
        urls: pod.hostnames.iter().map(|h| format!("http://{h}{port}")).collect(),
        id: pod.id,
        name: pod.name,
        state: pod.state,
        desired_state: pod.desired_state,
        reason: pod.reason,
        generation: pod.generation,
        image: pod.image,
        runtime: pod.runtime_id,
        preset: pod.preset_id,
        plan: pod.plan_id,
        region: pod.region,
        resources: ResourcesView {
            cpu_millis: pod.cpu_millis,
            memory_bytes: pod.memory_bytes,
            disk_bytes: pod.disk_bytes,
        },
        env: pod.env,
        command: pod.command,
        http_port: pod.http_port,
        restart_policy: pod.restart_policy,
        node: pod.node_name,
        ip: pod.ip,
        created_at: pod.created_at,
        updated_at: pod.updated_at,
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PodList {
    pub pods: Vec<PodView>,
}

/// What a new pod is made of. A preset fills in runtime, env, plan and port; a runtime fills in
/// image, command and port; what the request gives wins.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePodRequest {
    /// 3 to 40 lowercase letters, digits and hyphens; unique within the team.
    pub name: String,
    /// A catalog runtime (`GET /api/runtimes`).
    pub runtime: Option<String>,
    /// An OCI image reference; required unless a runtime or preset gives one.
    pub image: Option<String>,
    /// A catalog preset (`GET /api/presets`).
    pub preset: Option<String>,
    /// A plan (`GET /api/plans`); its CPU, memory and disk are the pod's. Default: the preset's,
    /// else the team's plan.
    pub plan: Option<String>,
    /// Default: the first available region.
    pub region: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Program and arguments; default: the runtime's command, else the image's.
    pub command: Option<Vec<String>>,
    /// The port the pod serves HTTP on; default: the runtime's or preset's.
    pub http_port: Option<u16>,
    /// `always` (default), `on-failure` or `never`.
    pub restart_policy: Option<String>,
}

/// Events of a pod.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub id: i64,
    /// `created`, `action`, `scheduled`, `unschedulable`, `state`, `failure`.
    pub kind: String,
    pub state: Option<String>,
    pub message: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<EventView>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<i64>,
}

/// The preset a pod was created from.
#[derive(Debug, Serialize, ToSchema)]
pub struct PresetView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub runtime: String,
    pub env: serde_json::Value,
    pub ports: Vec<i32>,
    pub plan: String,
    pub services: Vec<String>,
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("no pod named {name:?} in your active team"))
}

/// List your team's pods
/// `region` if it exists and is available, else 400 `unknown_region`.
async fn available_region(client: &deadpool_postgres::Client, region: &str) -> Result<String, ApiError> {
    client
        .query_opt("SELECT id FROM regions WHERE id = $1 AND available", &[&region])
        .await?
        .map(|r| r.get::<_, String>(0))
        .ok_or_else(|| {
            ApiError::bad_request(
                "unknown_region",
                format!("no available region {region:?} (see GET /api/regions)"),
            )
        })
}

#[endpoint(tags("pods"))]
pub async fn list(depot: &mut Depot) -> Result<Json<PodList>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let rows = store::list(&state.db, me.team_id).await?;
    Ok(Json(PodList {
        pods: rows.into_iter().map(|p| view(state, p)).collect(),
    }))
}

/// Get a pod
#[endpoint(tags("pods"))]
pub async fn get(name: PathParam<String>, depot: &mut Depot) -> Result<Json<PodView>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let pod = store::get(&state.db, me.team_id, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    Ok(Json(view(state, pod)))
}

/// Create a pod
///
/// Answers 202 with the pod in state `pending`; it is placed and started in the background.
#[endpoint(tags("pods"), request_body = CreatePodRequest)]
pub async fn create(req: &mut Request, depot: &mut Depot) -> Result<Accepted<PodView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    crate::api::auth::limit(req, &state, ratelimit::CREATE_POD).await?;
    let body: CreatePodRequest = json::read(req).await?;
    let name = validate::name(&body.name).map_err(ApiError::validation)?;
    validate::env(&body.env).map_err(ApiError::validation)?;
    if let Some(command) = &body.command {
        validate::command(command).map_err(ApiError::validation)?;
    }
    let client = db::connect(&state.db).await?;
    // Preset → runtime, env, plan, port.
    let preset_row = match &body.preset {
        Some(id) => Some(
            client
                .query_opt(
                    "SELECT runtime_id, env, ports, plan_id FROM presets WHERE id = $1",
                    &[id],
                )
                .await?
                .ok_or_else(|| {
                    ApiError::bad_request("unknown_preset", format!("no preset {id:?} (see GET /api/presets)"))
                })?,
        ),
        None => None,
    };
    let runtime_id: Option<String> = body
        .runtime
        .clone()
        .or_else(|| preset_row.as_ref().map(|p| p.get::<_, String>(0)));
    let runtime = match &runtime_id {
        Some(id) => Some(
            client
                .query_opt(
                    "SELECT image, default_command, http_port FROM runtimes WHERE id = $1",
                    &[id],
                )
                .await?
                .ok_or_else(|| {
                    ApiError::bad_request("unknown_runtime", format!("no runtime {id:?} (see GET /api/runtimes)"))
                })?,
        ),
        None => None,
    };
    let image = match (&body.image, &runtime, &runtime_id) {
        (Some(image), _, _) => image.trim().to_string(),
        (None, Some(runtime), Some(id)) => state
            .config
            .runtime_images
            .get(id)
            .cloned()
            .unwrap_or_else(|| runtime.get::<_, String>(0)),
        _ => return Err(ApiError::validation("give an image, a runtime or a preset")),
    };
    if image.is_empty() || image.len() > 512 || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::validation(format!(
            "image {image:?} is not an image reference"
        )));
    }
    let mut env: BTreeMap<String, String> = preset_row
        .as_ref()
        .and_then(|p| serde_json::from_value(p.get::<_, serde_json::Value>(1)).ok())
        .unwrap_or_default();
    env.extend(body.env.clone());
    validate::env(&env).map_err(ApiError::validation)?;
    let command = body.command.clone().or_else(|| {
        runtime
            .as_ref()
            .map(|r| r.get::<_, Vec<String>>(1))
            .filter(|c| !c.is_empty())
    });
    let http_port: Option<i32> = body
        .http_port
        .map(i32::from)
        .or_else(|| runtime.as_ref().map(|r| r.get::<_, i32>(2)))
        .or_else(|| {
            preset_row
                .as_ref()
                .and_then(|p| p.get::<_, Vec<i32>>(2).first().copied())
        });
    if http_port == Some(0) {
        return Err(ApiError::validation("http_port must be 1 to 65535"));
    }
    let team = client
        .query_one("SELECT slug, plan_id FROM teams WHERE id = $1", &[&me.team_id])
        .await?;
    let (slug, team_plan): (String, String) = (team.get(0), team.get(1));
    let plan_id = body
        .plan
        .clone()
        .or_else(|| preset_row.as_ref().map(|p| p.get::<_, String>(3)))
        .unwrap_or(team_plan);
    let plan = client
        .query_opt(
            "SELECT cpu_millicores, memory_mib, disk_gib FROM plans WHERE id = $1",
            &[&plan_id],
        )
        .await?
        .ok_or_else(|| ApiError::bad_request("unknown_plan", format!("no plan {plan_id:?} (see GET /api/plans)")))?;
    let region = match &body.region {
        Some(region) => available_region(&client, region).await?,
        None => client
            .query_one(
                "SELECT id FROM regions WHERE available ORDER BY sort_order, id LIMIT 1",
                &[],
            )
            .await?
            .get(0),
    };
    let restart_policy = body.restart_policy.clone().unwrap_or_else(|| "always".to_string());
    if !["always", "on-failure", "never"].contains(&restart_policy.as_str()) {
        return Err(ApiError::validation(
            "restart_policy must be always, on-failure or never",
        ));
    }
    drop(client);
    let new = NewPod {
        team_id: me.team_id,
        created_by: me.user_id,
        hostnames: vec![format!("{name}-{slug}.{}", state.config.apps_domain)],
        name,
        image,
        runtime_id,
        preset_id: body.preset.clone(),
        plan_id,
        region,
        cpu_millis: plan.get(0),
        memory_bytes: i64::from(plan.get::<_, i32>(1)) * 1024 * 1024,
        disk_bytes: i64::from(plan.get::<_, i32>(2)) * 1024 * 1024 * 1024,
        env,
        command,
        http_port,
        restart_policy,
    };
    let pod = store::create(&state.db, &new).await.map_err(create_error)?;
    state.pod_queue.push("create", pod.id, pod.generation).await;
    Ok(Accepted(view(&state, pod)))
}

fn create_error(err: CreateError) -> ApiError {
    match err {
        CreateError::NameTaken(name) => {
            ApiError::conflict("pod_name_taken", format!("a pod named {name:?} exists in this team"))
        }
        CreateError::Quota(message) => ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", message),
        CreateError::Db(err) => err.into(),
    }
}

/// What a clone is called and where it may run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClonePodRequest {
    /// The new pod's name: the same rules as for create.
    pub name: String,
    /// Default: the source pod's region.
    pub region: Option<String>,
}

/// Clone a pod
///
/// A new pod with the source's configuration (image, runtime, preset, plan and resources, env,
/// command, port, restart policy) and a copy of its volume, placed by the scheduler on any node
/// with room. Answers 202 with the new pod in `pending`; the volume is streamed from the
/// source's node and verified before the clone starts. Quota, naming and the creation rate
/// limit are those of create.
#[endpoint(tags("pods"), request_body = ClonePodRequest)]
pub async fn clone(
    name: PathParam<String>,
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Accepted<PodView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    crate::api::auth::limit(req, &state, ratelimit::CREATE_POD).await?;
    let body: ClonePodRequest = json::read(req).await?;
    let new_name = validate::name(&body.name).map_err(ApiError::validation)?;
    let source = store::get(&state.db, me.team_id, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    let client = db::connect(&state.db).await?;
    let region = match &body.region {
        Some(region) => available_region(&client, region).await?,
        None => source.region.clone(),
    };
    let slug: String = client
        .query_one("SELECT slug FROM teams WHERE id = $1", &[&me.team_id])
        .await?
        .get(0);
    drop(client);
    let new = NewPod {
        team_id: me.team_id,
        created_by: me.user_id,
        hostnames: vec![format!("{new_name}-{slug}.{}", state.config.apps_domain)],
        name: new_name,
        image: source.image.clone(),
        runtime_id: source.runtime_id.clone(),
        preset_id: source.preset_id.clone(),
        plan_id: source.plan_id.clone(),
        region,
        cpu_millis: source.cpu_millis,
        memory_bytes: source.memory_bytes,
        disk_bytes: source.disk_bytes,
        env: source.env.clone(),
        command: source.command.clone(),
        http_port: source.http_port,
        restart_policy: source.restart_policy.clone(),
    };
    let pod = match store::create_clone(&state.db, source.id, &new).await {
        Ok(pod) => pod,
        Err(CloneError::NotFound(_)) => return Err(not_found(&name)),
        Err(CloneError::State(message)) => return Err(ApiError::conflict("invalid_state", message)),
        Err(CloneError::Create(err)) => return Err(create_error(err)),
    };
    state.pod_queue.push("clone", pod.id, pod.generation).await;
    Ok(Accepted(view(&state, pod)))
}

async fn act(name: &str, depot: &mut Depot, action: Action) -> Result<Accepted<PodView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    match store::act(&state.db, me.team_id, name, action).await? {
        ActOutcome::NotFound => Err(not_found(name)),
        ActOutcome::Conflict { pod, message } => Err(ApiError::conflict(
            "invalid_state",
            format!("cannot {} the pod: {message} (state {})", action.as_str(), pod.state),
        )),
        ActOutcome::Accepted { pod, enqueue } => {
            if enqueue {
                state.pod_queue.push(action.as_str(), pod.id, pod.generation).await;
            }
            Ok(Accepted(view(&state, pod)))
        }
    }
}

/// Delete a pod
///
/// 202: the pod moves to `deleting`; once its node removed it (volume included), it is gone.
#[endpoint(tags("pods"))]
pub async fn delete(name: PathParam<String>, depot: &mut Depot) -> Result<Accepted<PodView>, ApiError> {
    act(&name, depot, Action::Delete).await
}

/// Start a pod
#[endpoint(tags("pods"))]
pub async fn start(name: PathParam<String>, depot: &mut Depot) -> Result<Accepted<PodView>, ApiError> {
    act(&name, depot, Action::Start).await
}

/// Stop a pod
#[endpoint(tags("pods"))]
pub async fn stop(name: PathParam<String>, depot: &mut Depot) -> Result<Accepted<PodView>, ApiError> {
    act(&name, depot, Action::Stop).await
}

/// Restart a pod
#[endpoint(tags("pods"))]
pub async fn restart(name: PathParam<String>, depot: &mut Depot) -> Result<Accepted<PodView>, ApiError> {
    act(&name, depot, Action::Restart).await
}

/// Get the preset a pod was created from
#[endpoint(tags("pods"))]
pub async fn preset(name: PathParam<String>, depot: &mut Depot) -> Result<Json<PresetView>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let client = db::connect(&state.db).await?;
    let pod = client
        .query_opt(
            "SELECT preset_id FROM pods WHERE team_id = $1 AND name = $2",
            &[&me.team_id, &*name],
        )
        .await?
        .ok_or_else(|| not_found(&name))?;
    let Some(preset_id) = pod.get::<_, Option<String>>(0) else {
        return Err(ApiError::not_found(format!(
            "the pod {:?} was not created from a preset",
            &*name
        )));
    };
    let row = client
        .query_one(
            "SELECT id, name, description, runtime_id, env, ports, plan_id, services FROM presets WHERE id = $1",
            &[&preset_id],
        )
        .await?;
    Ok(Json(PresetView {
        id: row.get(0),
        name: row.get(1),
        description: row.get(2),
        runtime: row.get(3),
        env: row.get(4),
        ports: row.get(5),
        plan: row.get(6),
        services: row.get(7),
    }))
}

/// List a pod's events, newest first
#[endpoint(tags("pods"))]
pub async fn events(
    name: PathParam<String>,
    before: QueryParam<i64, false>,
    limit: QueryParam<i64, false>,
    depot: &mut Depot,
) -> Result<Json<EventList>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let limit = limit.into_inner().unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::validation("limit must be 1 to 200"));
    }
    let rows = store::events(&state.db, me.team_id, &name, before.into_inner(), limit)
        .await?
        .ok_or_else(|| not_found(&name))?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|e| e.id))
        .flatten();
    Ok(Json(EventList {
        events: rows
            .into_iter()
            .map(|e| EventView {
                id: e.id,
                kind: e.kind,
                state: e.state,
                message: e.message,
                created_at: e.created_at,
            })
            .collect(),
        next_before,
    }))
}

/// New limits: a plan, or explicit resources (both may be given; resources win).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub plan: Option<String>,
    pub cpu_millis: Option<i32>,
    pub memory_bytes: Option<i64>,
    pub disk_bytes: Option<i64>,
}

/// Resize a pod
///
/// Applied live on the pod's node when it has room (202). Otherwise the pod moves, volume
/// included, to another node of its region that has the room (202; it is stopped on the old
/// node, its volume streamed and verified, started on the new node, and only then removed from
/// the old one). Refused with 409 `no_room_on_node` when no node can take it (nothing changes),
/// 409 `invalid_state` while its volume is still being copied, 403 `quota_exceeded` past the
/// team's plan.
#[endpoint(tags("pods"), request_body = ResizeRequest)]
pub async fn resize(
    name: PathParam<String>,
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Accepted<PodView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let body: ResizeRequest = json::read(req).await?;
    let (mut cpu, mut memory, mut disk) = (None, None, None);
    if let Some(plan) = &body.plan {
        let client = db::connect(&state.db).await?;
        let row = client
            .query_opt(
                "SELECT cpu_millicores, memory_mib, disk_gib FROM plans WHERE id = $1",
                &[plan],
            )
            .await?
            .ok_or_else(|| ApiError::bad_request("unknown_plan", format!("no plan {plan:?} (see GET /api/plans)")))?;
        cpu = Some(row.get::<_, i32>(0));
        memory = Some(i64::from(row.get::<_, i32>(1)) * 1024 * 1024);
        disk = Some(i64::from(row.get::<_, i32>(2)) * 1024 * 1024 * 1024);
    }
    cpu = body.cpu_millis.or(cpu);
    memory = body.memory_bytes.or(memory);
    disk = body.disk_bytes.or(disk);
    let current = store::get(&state.db, me.team_id, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    let size = store::NewSize {
        plan_id: body.plan.clone(),
        cpu_millis: cpu.unwrap_or(current.cpu_millis),
        memory_bytes: memory.unwrap_or(current.memory_bytes),
        disk_bytes: disk.unwrap_or(current.disk_bytes),
    };
    if body.plan.is_none() && body.cpu_millis.is_none() && body.memory_bytes.is_none() && body.disk_bytes.is_none() {
        return Err(ApiError::validation(
            "give a plan or cpu_millis, memory_bytes or disk_bytes",
        ));
    }
    if !(10..=64_000).contains(&size.cpu_millis)
        || !(8 << 20..=1 << 40).contains(&size.memory_bytes)
        || !(1 << 20..=16 << 40).contains(&size.disk_bytes)
    {
        return Err(ApiError::validation(
            "cpu_millis must be 10 to 64000, memory_bytes 8 MiB to 1 TiB, disk_bytes 1 MiB to 16 TiB",
        ));
    }
    match store::resize(&state.db, me.team_id, &name, &size).await {
        Ok(pod) => {
            state.pod_queue.push("resize", pod.id, pod.generation).await;
            Ok(Accepted(view(&state, pod)))
        }
        Err(store::ResizeError::NotFound(_)) => Err(not_found(&name)),
        Err(store::ResizeError::State(message)) => Err(ApiError::conflict("invalid_state", message)),
        Err(store::ResizeError::Quota(message)) => Err(ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", message)),
        Err(store::ResizeError::NoRoom(message)) => Err(ApiError::conflict("no_room_on_node", message)),
        Err(store::ResizeError::Db(err)) => Err(err.into()),
    }
}
