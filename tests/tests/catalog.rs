//! The catalog: plans, regions, runtimes and presets, readable without authentication, with
//! the fields docs/api.md documents and references between them that resolve.

use std::collections::HashSet;

use instapod_tests::{Client, ControlPlane};
use serde_json::Value;

async fn list(client: &Client, path: &str, key: &str) -> Vec<Value> {
    let response = client.get_response(path).await;
    let body = response.json_with_status(200);
    let items = body[key]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no {key:?} array in {body}"))
        .clone();
    assert!(!items.is_empty(), "{path}: {key} is empty");
    items
}

fn ids(items: &[Value]) -> HashSet<String> {
    items
        .iter()
        .filter_map(|item| item["id"].as_str().map(str::to_string))
        .collect()
}

/// A predicate on one field's value.
type FieldCheck = fn(&Value) -> bool;

fn assert_fields(item: &Value, what: &str, fields: &[(&str, FieldCheck)]) {
    for (field, check) in fields {
        assert!(
            check(&item[*field]),
            "{what}: field {field:?} missing or of the wrong type in {item}"
        );
    }
}

fn non_empty_string(value: &Value) -> bool {
    value.as_str().is_some_and(|s| !s.is_empty())
}

fn positive_integer(value: &Value) -> bool {
    value.as_i64().is_some_and(|n| n > 0)
}

#[tokio::test]
async fn plans_include_free_and_three_paid_plans() {
    let cp = ControlPlane::start_default().await;
    let plans = list(&cp.client(), "/api/plans", "plans").await;
    for plan in &plans {
        assert_fields(
            plan,
            "plan",
            &[
                ("id", non_empty_string),
                ("name", non_empty_string),
                ("cpu_millicores", positive_integer),
                ("memory_mib", positive_integer),
                ("disk_gib", positive_integer),
                ("max_pods", positive_integer),
                ("price_cents_monthly", |v| v.as_i64().is_some_and(|n| n >= 0)),
            ],
        );
    }
    let free = plans
        .iter()
        .find(|plan| plan["id"] == "free")
        .unwrap_or_else(|| panic!("no plan with id \"free\": {plans:?}"));
    assert_eq!(free["price_cents_monthly"], 0);
    let paid = plans
        .iter()
        .filter(|plan| plan["price_cents_monthly"].as_i64().is_some_and(|p| p > 0))
        .count();
    assert!(paid >= 3, "at least three paid plans, got {paid}: {plans:?}");
    assert_eq!(ids(&plans).len(), plans.len(), "plan ids are unique");
}

#[tokio::test]
async fn regions_runtimes_and_presets_are_listed_without_authentication() {
    let cp = ControlPlane::start_default().await;
    let client = cp.client();

    let regions = list(&client, "/api/regions", "regions").await;
    for region in &regions {
        assert_fields(
            region,
            "region",
            &[
                ("id", non_empty_string),
                ("name", non_empty_string),
                ("available", Value::is_boolean),
            ],
        );
    }
    assert!(
        regions.iter().any(|r| r["available"] == true),
        "at least one available region: {regions:?}"
    );

    let runtimes = list(&client, "/api/runtimes", "runtimes").await;
    for runtime in &runtimes {
        assert_fields(
            runtime,
            "runtime",
            &[
                ("id", non_empty_string),
                ("name", non_empty_string),
                ("version", non_empty_string),
                ("image", non_empty_string),
                ("default_command", |v| {
                    v.as_array()
                        .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string))
                }),
                ("http_port", |v| v.as_i64().is_some_and(|p| (1..=65535).contains(&p))),
            ],
        );
    }
    let runtime_ids = ids(&runtimes);
    for expected in ["node", "python", "go", "static"] {
        assert!(
            runtime_ids.contains(expected),
            "runtime {expected} missing: {runtime_ids:?}"
        );
    }

    let plan_ids = ids(&list(&client, "/api/plans", "plans").await);
    let presets = list(&client, "/api/presets", "presets").await;
    for preset in &presets {
        assert_fields(
            preset,
            "preset",
            &[
                ("id", non_empty_string),
                ("name", non_empty_string),
                ("description", Value::is_string),
                ("runtime", non_empty_string),
                ("env", |v| {
                    v.as_object().is_some_and(|env| env.values().all(Value::is_string))
                }),
                ("ports", |v| {
                    v.as_array().is_some_and(|ports| {
                        ports
                            .iter()
                            .all(|p| p.as_i64().is_some_and(|p| (1..=65535).contains(&p)))
                    })
                }),
                ("plan", non_empty_string),
                ("services", |v| {
                    v.as_array().is_some_and(|s| s.iter().all(Value::is_string))
                }),
            ],
        );
        let runtime = preset["runtime"].as_str().unwrap_or_default();
        assert!(runtime_ids.contains(runtime), "preset runtime {runtime} is not listed");
        let plan = preset["plan"].as_str().unwrap_or_default();
        assert!(plan_ids.contains(plan), "preset plan {plan} is not listed");
    }
}

#[tokio::test]
async fn catalog_answers_the_same_with_a_token_and_refuses_writes() {
    let cp = ControlPlane::start_default().await;
    let user = instapod_tests::register_and_login(&cp).await;
    for (path, key) in [
        ("/api/plans", "plans"),
        ("/api/regions", "regions"),
        ("/api/runtimes", "runtimes"),
        ("/api/presets", "presets"),
    ] {
        let anonymous = list(&cp.client(), path, key).await;
        let authenticated = list(&user.client(), path, key).await;
        assert_eq!(anonymous, authenticated, "{path}");

        let response = user
            .client()
            .post_json(path, &serde_json::json!({"id": "hacked"}))
            .await;
        assert!(
            matches!(response.status, 404 | 405),
            "POST {path} answered {}: {}",
            response.status,
            response.text()
        );
        assert!(response.json()["error"]["code"].is_string(), "{}", response.text());
    }
    assert!(!ids(&list(&cp.client(), "/api/plans", "plans").await).contains("hacked"));
}
