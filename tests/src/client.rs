//! An HTTP client for the control plane's API with the test conveniences built in: a bearer
//! token, an optional cookie jar, a per-client fake client IP, and responses that are fully read
//! so assertions can print the body.
//!
//! Every client sends `X-Forwarded-For: <random 10.x.y.z>` unless told otherwise. Control planes
//! started by the harness trust 127.0.0.1 as a proxy by default, so each client has its own
//! rate-limit buckets; without that, tests registering many users would hit the 3/minute
//! registration limit of their shared loopback address.

use std::sync::Arc;

use reqwest::cookie::{CookieStore, Jar};
use reqwest::header::HeaderMap;
use reqwest::{Method, Url};
use serde::Serialize;
use serde_json::Value;

/// A client bound to one control plane's base URL.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
    client_ip: Option<String>,
    jar: Option<Arc<Jar>>,
}

fn build_http(jar: Option<Arc<Jar>>) -> reqwest::Client {
    let mut builder = crate::http_builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30));
    if let Some(jar) = jar {
        builder = builder.cookie_provider(jar);
    }
    builder.build().expect("a reqwest client without TLS always builds")
}

impl Client {
    /// A client without cookies or token, with a random client IP.
    pub fn new(base_url: &str) -> Client {
        Client {
            http: build_http(None),
            base_url: base_url.trim_end_matches('/').to_string(),
            token: None,
            client_ip: Some(crate::ids::random_client_ip()),
            jar: None,
        }
    }

    /// A client that stores cookies like a browser (and sends them back), with a random
    /// client IP and no token.
    pub fn with_cookie_jar(base_url: &str) -> Client {
        let jar = Arc::new(Jar::default());
        Client {
            http: build_http(Some(jar.clone())),
            base_url: base_url.trim_end_matches('/').to_string(),
            token: None,
            client_ip: Some(crate::ids::random_client_ip()),
            jar: Some(jar),
        }
    }

    /// The same client sending `Authorization: Bearer <token>`.
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    /// The same client without a bearer token.
    pub fn without_token(&self) -> Client {
        Client {
            token: None,
            ..self.clone()
        }
    }

    /// The same client with another `X-Forwarded-For` value (`None`: no header at all).
    pub fn with_client_ip(&self, client_ip: Option<&str>) -> Client {
        Client {
            client_ip: client_ip.map(str::to_string),
            ..self.clone()
        }
    }

    /// The control plane's base URL, e.g. `http://127.0.0.1:40123`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The bearer token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The `X-Forwarded-For` value sent, if any.
    pub fn client_ip(&self) -> Option<&str> {
        self.client_ip.as_deref()
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("{}{path}", self.base_url))
            .unwrap_or_else(|err| panic!("bad test URL {}{path}: {err}", self.base_url))
    }

    /// Puts a cookie into the jar as if the server had set it (`name=value`). Panics for a
    /// client without a jar.
    pub fn plant_cookie(&self, cookie: &str) {
        let jar = self.jar.as_ref().expect("plant_cookie needs with_cookie_jar");
        jar.add_cookie_str(&format!("{cookie}; Path=/"), &self.url("/"));
    }

    /// The `Cookie` header the jar would send to the control plane, if any.
    pub fn cookie_header(&self) -> Option<String> {
        let jar = self.jar.as_ref()?;
        jar.cookies(&self.url("/"))
            .and_then(|value| value.to_str().ok().map(str::to_string))
    }

    /// The value of the cookie `name` in the jar, if any.
    pub fn cookie(&self, name: &str) -> Option<String> {
        let header = self.cookie_header()?;
        header.split("; ").find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| value.to_string())
        })
    }

    /// Starts a request to `path` (which begins with `/`).
    pub fn request(&self, method: Method, path: &str) -> Request {
        let mut builder = self.http.request(method.clone(), self.url(path));
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        if let Some(ip) = &self.client_ip {
            builder = builder.header("X-Forwarded-For", ip);
        }
        Request {
            builder,
            description: format!("{method} {path}"),
        }
    }

    pub fn get(&self, path: &str) -> Request {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> Request {
        self.request(Method::POST, path)
    }

    pub fn put(&self, path: &str) -> Request {
        self.request(Method::PUT, path)
    }

    pub fn delete(&self, path: &str) -> Request {
        self.request(Method::DELETE, path)
    }

    /// `GET path`, sent.
    pub async fn get_response(&self, path: &str) -> Response {
        self.get(path).send().await
    }

    /// `POST path` with a JSON body, sent.
    pub async fn post_json(&self, path: &str, body: &impl Serialize) -> Response {
        self.post(path).json(body).send().await
    }

    /// `PUT path` with a JSON body, sent.
    pub async fn put_json(&self, path: &str, body: &impl Serialize) -> Response {
        self.put(path).json(body).send().await
    }

    /// `DELETE path` without a body, sent.
    pub async fn delete_response(&self, path: &str) -> Response {
        self.delete(path).send().await
    }
}

/// A request being built.
#[derive(Debug)]
pub struct Request {
    builder: reqwest::RequestBuilder,
    description: String,
}

impl Request {
    /// A JSON body with `Content-Type: application/json`.
    pub fn json(self, body: &impl Serialize) -> Request {
        Request {
            builder: self.builder.json(body),
            ..self
        }
    }

    /// A raw body with the given content type.
    pub fn raw_body(self, content_type: &str, body: impl Into<Vec<u8>>) -> Request {
        Request {
            builder: self.builder.header("Content-Type", content_type).body(body.into()),
            ..self
        }
    }

    /// One more header.
    pub fn header(self, name: &str, value: &str) -> Request {
        Request {
            builder: self.builder.header(name, value),
            ..self
        }
    }

    /// Sends the request and reads the whole response. Panics on transport errors.
    pub async fn send(self) -> Response {
        let description = self.description;
        let response = self
            .builder
            .send()
            .await
            .unwrap_or_else(|err| panic!("{description}: request failed: {err:#}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .unwrap_or_else(|err| panic!("{description}: cannot read the body: {err:#}"))
            .to_vec();
        Response {
            description,
            status,
            headers,
            body,
        }
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// `METHOD /path`, for messages.
    pub description: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "{} answered {} with a body that is not JSON ({err}): {}",
                self.description,
                self.status,
                self.text()
            )
        })
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    }

    /// Every value of header `name`.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok().map(str::to_string))
            .collect()
    }

    /// The `Set-Cookie` header for cookie `name`, if the response sets it.
    pub fn set_cookie(&self, name: &str) -> Option<String> {
        self.header_all("set-cookie")
            .into_iter()
            .find(|value| value.starts_with(&format!("{name}=")))
    }

    /// Panics unless the status is `status`, printing the body.
    pub fn assert_status(&self, status: u16) -> &Response {
        assert_eq!(
            self.status,
            status,
            "{} answered {} (expected {status}); body: {}",
            self.description,
            self.status,
            self.text()
        );
        self
    }

    /// Asserts the status and returns the JSON body.
    pub fn json_with_status(&self, status: u16) -> Value {
        self.assert_status(status);
        self.json()
    }

    /// Asserts an error response: the status, a JSON content type and the body
    /// `{"error": {"code": code, "message": non-empty string}}`. Returns the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        self.assert_status(status);
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{} answered {status} with content type {content_type:?}, expected JSON; body: {}",
            self.description,
            self.text()
        );
        let body = self.json();
        let actual_code = body["error"]["code"].as_str();
        assert_eq!(
            actual_code,
            Some(code),
            "{} answered {status} with error code {actual_code:?}, expected {code:?}; body: {body}",
            self.description
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty(),
            "{} error {code} has no message; body: {body}",
            self.description
        );
        message.to_string()
    }
}
