//! Reading JSON request bodies with the platform's rules: `application/json` only (415), at
//! most [`MAX_JSON_BODY`] bytes (413; [`MAX_NODE_JSON_BODY`] for the `/internal` node API),
//! unknown fields refused (the request types say `deny_unknown_fields`), and parse errors
//! answered as 400 `invalid_json` naming the problem.

use salvo::http::ParseError;
use salvo::http::StatusCode;
use salvo::prelude::*;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The largest JSON body accepted, in bytes.
pub const MAX_JSON_BODY: usize = 64 * 1024;

/// The largest body a node may send to `/internal` (a heartbeat listing its pods, a batch of
/// up to 1000 reports), in bytes.
pub const MAX_NODE_JSON_BODY: usize = 2 * 1024 * 1024;

pub async fn read<T: DeserializeOwned>(req: &mut Request) -> Result<T, ApiError> {
    read_with_limit(req, MAX_JSON_BODY).await
}

/// Like [`read`], with another size limit.
pub async fn read_with_limit<T: DeserializeOwned>(req: &mut Request, max_bytes: usize) -> Result<T, ApiError> {
    let is_json = req
        .content_type()
        .is_some_and(|mime| mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request body must be JSON with Content-Type: application/json",
        ));
    }
    let body = match req.payload_with_max_size(max_bytes).await {
        Ok(body) => body,
        Err(ParseError::PayloadTooLarge) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body must be at most {max_bytes} bytes"),
            ));
        }
        Err(err) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("cannot read request body: {err}"),
            ));
        }
    };
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request("invalid_json", format!("invalid JSON body: {err}")))
}
