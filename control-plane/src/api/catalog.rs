//! The four catalog endpoints: plans, regions, runtimes and presets. Seeded by migrations,
//! edited by operators in SQL, readable without authentication. A runtime's image may be
//! replaced by configuration (`runtime_images`).

use std::collections::BTreeMap;

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::Serialize;

use crate::db;
use crate::error::ApiError;
use crate::http::state::app;

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub id: String,
    pub name: String,
    pub cpu_millicores: i32,
    pub memory_mib: i32,
    pub disk_gib: i32,
    pub max_pods: i32,
    pub price_cents_monthly: i32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    pub plans: Vec<PlanView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegionView {
    pub id: String,
    pub name: String,
    pub available: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegionList {
    pub regions: Vec<RegionView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuntimeView {
    pub id: String,
    pub name: String,
    pub version: String,
    /// OCI image reference (the `runtime_images` setting overrides the catalog's).
    pub image: String,
    pub default_command: Vec<String>,
    pub http_port: i32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuntimeList {
    pub runtimes: Vec<RuntimeView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PresetView {
    pub id: String,
    pub name: String,
    pub description: String,
    /// Runtime id.
    pub runtime: String,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<i32>,
    /// Suggested plan id.
    pub plan: String,
    /// Services installed with the preset.
    pub services: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PresetList {
    pub presets: Vec<PresetView>,
}

/// List available plans
#[endpoint(tags("catalog"))]
pub async fn plans(depot: &mut Depot) -> Result<Json<PlanList>, ApiError> {
    let client = db::connect(&app(depot).db).await?;
    let rows = client
        .query(
            "SELECT id, name, cpu_millicores, memory_mib, disk_gib, max_pods, price_cents_monthly
             FROM plans ORDER BY sort_order, id",
            &[],
        )
        .await?;
    let list = rows
        .iter()
        .map(|row| PlanView {
            id: row.get(0),
            name: row.get(1),
            cpu_millicores: row.get(2),
            memory_mib: row.get(3),
            disk_gib: row.get(4),
            max_pods: row.get(5),
            price_cents_monthly: row.get(6),
        })
        .collect();
    Ok(Json(PlanList { plans: list }))
}

/// List available regions
#[endpoint(tags("catalog"))]
pub async fn regions(depot: &mut Depot) -> Result<Json<RegionList>, ApiError> {
    let client = db::connect(&app(depot).db).await?;
    let rows = client
        .query("SELECT id, name, available FROM regions ORDER BY sort_order, id", &[])
        .await?;
    let list = rows
        .iter()
        .map(|row| RegionView {
            id: row.get(0),
            name: row.get(1),
            available: row.get(2),
        })
        .collect();
    Ok(Json(RegionList { regions: list }))
}

/// List available runtimes
#[endpoint(tags("catalog"))]
pub async fn runtimes(depot: &mut Depot) -> Result<Json<RuntimeList>, ApiError> {
    let state = app(depot);
    let client = db::connect(&state.db).await?;
    let rows = client
        .query(
            "SELECT id, name, version, image, default_command, http_port FROM runtimes ORDER BY sort_order, id",
            &[],
        )
        .await?;
    let list = rows
        .iter()
        .map(|row| {
            let id: String = row.get(0);
            // `runtime_images` points a runtime at another registry (the local stack's).
            let image = match state.config.runtime_images.get(&id) {
                Some(image) => image.clone(),
                None => row.get(3),
            };
            RuntimeView {
                id,
                name: row.get(1),
                version: row.get(2),
                image,
                default_command: row.get(4),
                http_port: row.get(5),
            }
        })
        .collect();
    Ok(Json(RuntimeList { runtimes: list }))
}

/// List available presets
#[endpoint(tags("catalog"))]
pub async fn presets(depot: &mut Depot) -> Result<Json<PresetList>, ApiError> {
    let client = db::connect(&app(depot).db).await?;
    let rows = client
        .query(
            "SELECT id, name, description, runtime_id, env, ports, plan_id, services FROM presets ORDER BY sort_order, id",
            &[],
        )
        .await?;
    let mut list = Vec::with_capacity(rows.len());
    for row in &rows {
        let env: serde_json::Value = row.get(4);
        let env: BTreeMap<String, String> = serde_json::from_value(env).map_err(|err| {
            tracing::error!(preset = row.get::<_, String>(0), error = %err, "preset env is not a string map");
            ApiError::internal()
        })?;
        list.push(PresetView {
            id: row.get(0),
            name: row.get(1),
            description: row.get(2),
            runtime: row.get(3),
            env,
            ports: row.get(5),
            plan: row.get(6),
            services: row.get(7),
        });
    }
    Ok(Json(PresetList { presets: list }))
}
