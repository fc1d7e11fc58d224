//! Response wrappers for statuses other than 200, so handlers state their status in the type
//! and the OpenAPI document lists it.

use salvo::http::StatusCode;
use salvo::oapi::{self, Components, EndpointOutRegister, Operation, ToSchema};
use salvo::prelude::*;
use serde::Serialize;

/// 201 Created with a JSON body.
#[derive(Debug)]
pub struct Created<T>(pub T);

/// 202 Accepted with a JSON body.
#[derive(Debug)]
pub struct Accepted<T>(pub T);

/// 204 No Content.
#[derive(Debug)]
pub struct NoContent;

/// 200 or 201 decided at run time (an upsert-like operation).
#[derive(Debug)]
pub struct OkOrCreated<T> {
    pub created: bool,
    pub body: T,
}

#[async_trait]
impl<T: Serialize + Send> Writer for Created<T> {
    async fn write(self, _req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        res.status_code(StatusCode::CREATED);
        res.render(Json(self.0));
    }
}

#[async_trait]
impl<T: Serialize + Send> Writer for Accepted<T> {
    async fn write(self, _req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        res.status_code(StatusCode::ACCEPTED);
        res.render(Json(self.0));
    }
}

#[async_trait]
impl Writer for NoContent {
    async fn write(self, _req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        res.status_code(StatusCode::NO_CONTENT);
    }
}

#[async_trait]
impl<T: Serialize + Send> Writer for OkOrCreated<T> {
    async fn write(self, _req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        res.status_code(if self.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        });
        res.render(Json(self.body));
    }
}

fn json_response<T: ToSchema>(components: &mut Components, description: &str) -> oapi::Response {
    oapi::Response::new(description).add_content("application/json", oapi::Content::new(T::to_schema(components)))
}

impl<T: ToSchema + Send> EndpointOutRegister for Created<T> {
    fn register(components: &mut Components, operation: &mut Operation) {
        operation
            .responses
            .insert("201", json_response::<T>(components, "Created"));
    }
}

impl<T: ToSchema + Send> EndpointOutRegister for Accepted<T> {
    fn register(components: &mut Components, operation: &mut Operation) {
        operation
            .responses
            .insert("202", json_response::<T>(components, "Accepted"));
    }
}

impl EndpointOutRegister for NoContent {
    fn register(_components: &mut Components, operation: &mut Operation) {
        operation.responses.insert("204", oapi::Response::new("No content"));
    }
}

impl<T: ToSchema + Send> EndpointOutRegister for OkOrCreated<T> {
    fn register(components: &mut Components, operation: &mut Operation) {
        operation
            .responses
            .insert("200", json_response::<T>(components, "Updated"));
        operation
            .responses
            .insert("201", json_response::<T>(components, "Created"));
    }
}
