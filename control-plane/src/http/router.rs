//! The route table: every path of the spec that is implemented, the internal node API under
//! `/internal`, the hoops around them, and the OpenAPI document built from the public routes.

use salvo::affix_state;
use salvo::catcher::Catcher;
use salvo::oapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme};
use salvo::oapi::swagger_ui::SwaggerUi;
use salvo::oapi::{OpenApi, SecurityScheme};
use salvo::prelude::*;

use crate::api;
use crate::http::state::AppState;
use crate::http::{auth, metrics};

/// The API routes (documented in OpenAPI).
fn api_router() -> Router {
    let public = Router::new()
        .push(Router::with_path("auth/register").post(api::auth::register))
        .push(Router::with_path("auth/login").post(api::auth::login))
        .push(Router::with_path("auth/forgot-password").post(api::auth::forgot_password))
        .push(Router::with_path("auth/reset-password").post(api::auth::reset_password))
        .push(Router::with_path("auth/verify-email").post(api::auth::verify_email))
        .push(Router::with_path("plans").get(api::catalog::plans))
        .push(Router::with_path("presets").get(api::catalog::presets))
        .push(Router::with_path("regions").get(api::catalog::regions))
        .push(Router::with_path("runtimes").get(api::catalog::runtimes));
    let authenticated = Router::new()
        .hoop(auth::require_auth)
        .push(Router::with_path("auth/logout").post(api::auth::logout))
        .push(Router::with_path("auth/user").get(api::auth::current_user))
        .push(
            Router::with_path("teams")
                .get(api::teams::list)
                .post(api::teams::create),
        )
        .push(Router::with_path("teams/switch").post(api::teams::switch))
        .push(
            Router::with_path("teams/{id}")
                .get(api::teams::get)
                .put(api::teams::update)
                .delete(api::teams::delete),
        )
        .push(
            Router::with_path("teams/{id}/members")
                .get(api::teams::members)
                .post(api::teams::add_member),
        )
        .push(Router::with_path("teams/{id}/members/{uid}").delete(api::teams::remove_member))
        .push(Router::with_path("pods").get(api::pods::list).post(api::pods::create))
        .push(
            Router::with_path("pods/{name}")
                .get(api::pods::get)
                .delete(api::pods::delete),
        )
        .push(Router::with_path("pods/{name}/start").post(api::pods::start))
        .push(Router::with_path("pods/{name}/stop").post(api::pods::stop))
        .push(Router::with_path("pods/{name}/restart").post(api::pods::restart))
        .push(Router::with_path("pods/{name}/resize").post(api::pods::resize))
        .push(Router::with_path("pods/{name}/clone").post(api::pods::clone))
        .push(Router::with_path("pods/{name}/preset").get(api::pods::preset))
        .push(Router::with_path("pods/{name}/events").get(api::pods::events))
        .push(Router::with_path("pods/{name}/logs").get(api::logs::logs))
        .push(Router::with_path("pods/{name}/metrics").get(api::metrics::current))
        .push(Router::with_path("pods/{name}/metrics/history").get(api::metrics::history))
        .push(
            Router::with_path("pods/{name}/files")
                .get(api::files::list)
                .delete(api::files::delete),
        )
        .push(
            Router::with_path("pods/{name}/files/content")
                .get(api::files::read)
                .put(api::files::write),
        )
        .push(Router::with_path("pods/{name}/files/upload").post(api::files::upload))
        .push(Router::with_path("pods/{name}/folders").post(api::files::create_folder))
        .push(Router::with_path("pods/{name}/ssh").get(api::ssh::connection))
        .push(
            Router::with_path("pods/{name}/domains")
                .get(api::domains::list)
                .post(api::domains::add),
        )
        .push(Router::with_path("pods/{name}/domains/{id}").delete(api::domains::remove))
        .push(Router::with_path("pods/{name}/domains/{id}/verify").post(api::domains::verify))
        .push(
            Router::with_path("pods/{name}/ssh/keys")
                .get(api::ssh::list_keys)
                .post(api::ssh::add_key)
                .delete(api::ssh::remove_key),
        );
    Router::with_path("api").push(public).push(authenticated)
}

/// The internal API for node agents (bearer tokens only; not in the OpenAPI document).
fn internal_router() -> Router {
    Router::with_path("internal/nodes")
        .push(Router::with_path("join").post(api::internal::join))
        .push(Router::with_path("{id}/heartbeat").post(api::internal::heartbeat))
        .push(Router::with_path("{id}/reports").post(api::internal::reports))
        .push(Router::with_path("{id}/routes").get(api::internal::routes))
        .push(Router::with_path("{id}/metrics").post(api::internal::metrics))
        .push(Router::with_path("{id}/ssh/authorize").post(api::internal::ssh_authorize))
        .push(Router::with_path("{id}/domains").get(api::internal_domains::served))
        .push(Router::with_path("{id}/domains/{domain_id}/verification").post(api::internal_domains::verification))
        .push(Router::with_path("{id}/domains/{domain_id}/certificate").put(api::internal_domains::certificate))
        .push(
            Router::with_path("{id}/domains/{domain_id}/certificate-failure")
                .post(api::internal_domains::certificate_failure),
        )
        .push(
            Router::with_path("{id}/acme-account")
                .get(api::internal_domains::acme_account)
                .put(api::internal_domains::put_acme_account),
        )
}

fn platform_router() -> Router {
    let mut router = Router::new().get(api::pages::account_page);
    for path in ["login", "register", "verify-email", "forgot-password", "reset-password"] {
        router = router.push(Router::with_path(path).get(api::pages::account_page));
    }
    router
        .push(Router::with_path("healthz").get(api::platform::healthz))
        .push(Router::with_path("readyz").get(api::platform::readyz))
        .push(Router::with_path("metrics").get(api::platform::metrics))
}

/// The OpenAPI document for the API routes.
pub fn openapi() -> OpenApi {
    let api = api_router();
    let platform = platform_router();
    OpenApi::new("Instapod API", env!("CARGO_PKG_VERSION"))
        .add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)))
        .add_security_scheme(
            "session_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(auth::SESSION_COOKIE))),
        )
        .merge_router(&api)
        .merge_router(&platform)
}

/// The whole service: routes, state, metrics, the same-origin rule and JSON error bodies.
pub fn service(state: AppState) -> Service {
    let doc = openapi();
    let router = Router::new()
        .push(api_router())
        .push(internal_router())
        .push(platform_router())
        .push(doc.into_router("/api/openapi.json"))
        .push(SwaggerUi::new("/api/openapi.json").into_router("/api/docs"));
    Service::new(router)
        .hoop(metrics::record)
        .hoop(affix_state::inject(state))
        .hoop(auth::same_origin)
        .catcher(Catcher::new(api::platform::json_errors))
}
