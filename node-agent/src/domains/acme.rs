//! Ordering certificates with instant-acme: the platform's ACME account (kept by the control
//! plane, created by the first node that needs it) and HTTP-01 orders answered by this node's
//! ingress.
//!
//! *Flow.* [`AcmeIssuer::issue`] gets the account ([`AccountStore`]: `GET
//! /internal/nodes/{id}/acme-account`; when it has no credentials yet, creates one on the CA
//! and `PUT`s it — the first node to store one wins, the others use the stored one), places an
//! order for the host name, adds each pending authorization's HTTP-01 key authorization to the
//! [`ChallengeStore`] (removed when the order ends, whatever happens), tells the CA the
//! challenges are ready, waits until the order is ready, finalizes with a fresh key (instant-acme
//! makes the CSR) and downloads the chain. The validity is read from the leaf.
//!
//! *Errors.* An answer of the CA (a problem document, a failed challenge, an invalid order)
//! becomes an [`IssueFailure`] for the control plane, which backs off (`rate_limited` when the
//! CA says `rateLimited`, and `retry_after_secs` from the CA's `Retry-After`, which instant-acme
//! drops: its requests go through [`AcmeHttp`], which keeps it). Not reaching the control plane
//! for the account is a transient job error (retried by the consumer).
//!
//! *Limitations.* HTTP-01 only (the CA must reach this node's ingress on port 80 for the host
//! name; with several nodes, a challenge that reaches another node is routed to the pod's node
//! like any request, and the order is always placed by the pod's node). One account per
//! platform; no account key rollover.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use instapod_common::domains::{AcmeAccount, IssueFailure, IssuedCertificate};

use super::acme_http::{AcmeHttp, RetryAfter};
use super::challenges::ChallengeStore;
use crate::fleet::{Fleet, FleetError};

/// How long the CA may take to validate the challenges, and then to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);
const ISSUE_TIMEOUT: Duration = Duration::from_secs(60);
/// The ACME problem type of a rate limit.
const RATE_LIMITED: &str = "urn:ietf:params:acme:error:rateLimited";

/// Where the platform's ACME account is kept.
pub trait AccountStore: Send + Sync {
    fn get_account(&self) -> impl std::future::Future<Output = Result<AcmeAccount, FleetError>> + Send;
    /// Stores `account` unless credentials were stored first; answers the stored account.
    fn put_account(
        &self,
        account: &AcmeAccount,
    ) -> impl std::future::Future<Output = Result<AcmeAccount, FleetError>> + Send;
}

impl AccountStore for Fleet {
    async fn get_account(&self) -> Result<AcmeAccount, FleetError> {
        let response = self
            .send_as_node::<()>(reqwest::Method::GET, "acme-account", None, "the ACME account")
            .await?;
        read_json(response, "the ACME account").await
    }

    async fn put_account(&self, account: &AcmeAccount) -> Result<AcmeAccount, FleetError> {
        let response = self
            .send_as_node(reqwest::Method::PUT, "acme-account", Some(account), "the ACME account")
            .await?;
        read_json(response, "the ACME account").await
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    what: &'static str,
) -> Result<T, FleetError> {
    let url = response.url().to_string();
    response.json().await.map_err(|err| FleetError::Unreachable {
        url,
        reason: format!("unreadable {what}: {}", crate::error_chain(&err)),
    })
}

/// Why no certificate was issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The control plane did not give the account (transient: the job is retried).
    #[error("cannot get the ACME account from the control plane: {0}")]
    Account(#[from] FleetError),
    /// The account credentials stored by the control plane are not instant-acme's.
    #[error("the stored ACME account credentials are unusable: {0}")]
    Credentials(String),
    /// The CA (or reaching it) failed at `stage`.
    #[error("the ACME CA failed to {stage} for {hostname}: {error}")]
    Acme {
        stage: &'static str,
        hostname: String,
        error: instant_acme::Error,
    },
    /// The order ended without a certificate (a challenge failed, the order went invalid).
    #[error("the ACME order for {hostname} failed: {message}")]
    Order { hostname: String, message: String },
    /// The CA's certificate cannot be read.
    #[error("the certificate the CA issued for {hostname} cannot be read: {message}")]
    Certificate { hostname: String, message: String },
}

impl IssueError {
    /// Whether the job should be retried (rather than reported as an issuing failure).
    pub fn is_transient(&self) -> bool {
        matches!(self, IssueError::Account(_))
    }

    /// The report for the control plane (without the CA's `Retry-After`: see
    /// [`AcmeIssuer::failure`]).
    pub fn to_failure(&self) -> IssueFailure {
        let rate_limited = matches!(
            self,
            IssueError::Acme {
                error: instant_acme::Error::Api(problem),
                ..
            } if problem.r#type.as_deref() == Some(RATE_LIMITED)
        );
        IssueFailure {
            message: self.to_string(),
            rate_limited,
            retry_after_secs: None,
        }
    }
}

/// Orders certificates for this node.
pub struct AcmeIssuer {
    /// An extra root for the CA's HTTPS (a test CA such as Pebble's); the system's roots
    /// otherwise.
    ca_file: Option<PathBuf>,
    challenges: Arc<ChallengeStore>,
    /// The account last used, with the credentials (JSON) it was made from.
    account: tokio::sync::Mutex<Option<(serde_json::Value, Account)>>,
    /// The CA's last `Retry-After` (kept by every client [`AcmeHttp`] of this issuer).
    retry_after: Arc<RetryAfter>,
}

impl std::fmt::Debug for AcmeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeIssuer")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl AcmeIssuer {
    pub fn new(ca_file: Option<PathBuf>, challenges: Arc<ChallengeStore>) -> AcmeIssuer {
        AcmeIssuer {
            ca_file,
            challenges,
            account: tokio::sync::Mutex::new(None),
            retry_after: Arc::default(),
        }
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, instant_acme::Error> {
        let http = AcmeHttp::new(self.ca_file.as_deref(), self.retry_after.clone())?;
        Ok(Account::builder_with_http(Box::new(http)))
    }

    /// The report of `err` for the control plane, with the seconds the CA asked to wait when
    /// its failing answer carried a `Retry-After`.
    pub fn failure(&self, err: &IssueError) -> IssueFailure {
        let mut failure = err.to_failure();
        if matches!(
            err,
            IssueError::Acme {
                error: instant_acme::Error::Api(_),
                ..
            }
        ) {
            failure.retry_after_secs = self.retry_after.take_fresh();
        }
        failure
    }

    fn acme_error<'a>(stage: &'static str, hostname: &'a str) -> impl FnOnce(instant_acme::Error) -> IssueError + 'a {
        move |error| IssueError::Acme {
            stage,
            hostname: hostname.to_string(),
            error,
        }
    }

    /// The platform's account: the stored one, or a new one stored for every node.
    async fn account<S: AccountStore>(&self, store: &S, hostname: &str) -> Result<Account, IssueError> {
        let mut cached = self.account.lock().await;
        let mut stored = store.get_account().await?;
        if stored.credentials.is_none() {
            let contact: Vec<&str> = stored.contact.iter().map(String::as_str).collect();
            let (_, credentials) = self
                .builder()
                .map_err(Self::acme_error("set up its client", hostname))?
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    stored.directory_url.clone(),
                    None,
                )
                .await
                .map_err(Self::acme_error("create the account", hostname))?;
            let value = serde_json::to_value(&credentials).map_err(|err| IssueError::Credentials(err.to_string()))?;
            tracing::info!(directory = %stored.directory_url, "ACME account created; storing it for the platform");
            stored = store
                .put_account(&AcmeAccount {
                    credentials: Some(value),
                    ..stored
                })
                .await?;
        }
        let Some(value) = stored.credentials else {
            return Err(IssueError::Credentials(
                "the control plane stored no credentials".into(),
            ));
        };
        if let Some((known, account)) = cached.as_ref()
            && *known == value
        {
            return Ok(account.clone());
        }
        let credentials: AccountCredentials =
            serde_json::from_value(value.clone()).map_err(|err| IssueError::Credentials(err.to_string()))?;
        let account = self
            .builder()
            .map_err(Self::acme_error("set up its client", hostname))?
            .from_credentials(credentials)
            .await
            .map_err(Self::acme_error("load the account", hostname))?;
        *cached = Some((value, account.clone()));
        Ok(account)
    }

    /// Orders a certificate for `hostname` (HTTP-01).
    pub async fn issue<S: AccountStore>(&self, store: &S, hostname: &str) -> Result<IssuedCertificate, IssueError> {
        let account = self.account(store, hostname).await?;
        let identifiers = [Identifier::Dns(hostname.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(Self::acme_error("create the order", hostname))?;
        // Answered by the ingress until this guard drops (the order ended, however).
        let mut tokens = self.challenges.order();
        {
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization.map_err(Self::acme_error("fetch an authorization", hostname))?;
                match authorization.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        return Err(IssueError::Order {
                            hostname: hostname.to_string(),
                            message: format!("an authorization is {other:?}"),
                        });
                    }
                }
                let mut challenge =
                    authorization
                        .challenge(ChallengeType::Http01)
                        .ok_or_else(|| IssueError::Order {
                            hostname: hostname.to_string(),
                            message: "the CA offers no http-01 challenge".into(),
                        })?;
                tokens.add(&challenge.token, challenge.key_authorization().as_str(), hostname);
                challenge
                    .set_ready()
                    .await
                    .map_err(Self::acme_error("accept the challenge", hostname))?;
            }
        }
        let status = order
            .poll_ready(&RetryPolicy::new().timeout(VALIDATION_TIMEOUT))
            .await
            .map_err(Self::acme_error("validate the challenge", hostname))?;
        if status != OrderStatus::Ready {
            let message = order_problems(&mut order).await;
            return Err(IssueError::Order {
                hostname: hostname.to_string(),
                message: format!("the order is {status:?}: {message}"),
            });
        }
        let key_pem = order
            .finalize()
            .await
            .map_err(Self::acme_error("finalize the order", hostname))?;
        let chain_pem = order
            .poll_certificate(&RetryPolicy::new().timeout(ISSUE_TIMEOUT))
            .await
            .map_err(Self::acme_error("issue the certificate", hostname))?;
        drop(tokens);
        let (not_before, not_after) =
            super::tls::chain_validity(&chain_pem).ok_or_else(|| IssueError::Certificate {
                hostname: hostname.to_string(),
                message: "no readable leaf certificate".into(),
            })?;
        // The pair must load as the ingress will load it.
        super::tls::certified_key(&chain_pem, &key_pem).map_err(|err| IssueError::Certificate {
            hostname: hostname.to_string(),
            message: err.to_string(),
        })?;
        Ok(IssuedCertificate {
            chain_pem,
            key_pem,
            not_before,
            not_after,
        })
    }
}

/// What the CA says went wrong with an order: its error and its challenges' errors.
async fn order_problems(order: &mut instant_acme::Order) -> String {
    let mut problems = Vec::new();
    if let Some(problem) = &order.state().error {
        problems.push(problem.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        match authorization {
            Ok(authorization) => {
                for challenge in &authorization.challenges {
                    if let Some(problem) = &challenge.error {
                        problems.push(format!("{:?}: {problem}", challenge.r#type));
                    }
                }
            }
            Err(err) => problems.push(format!("cannot fetch an authorization: {err}")),
        }
    }
    if problems.is_empty() {
        "the CA gave no reason".into()
    } else {
        problems.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An account store without credentials yet (the issuer creates the account).
    struct NoAccount(String);

    impl AccountStore for NoAccount {
        async fn get_account(&self) -> Result<AcmeAccount, FleetError> {
            Ok(AcmeAccount {
                directory_url: self.0.clone(),
                contact: Vec::new(),
                credentials: None,
            })
        }

        async fn put_account(&self, account: &AcmeAccount) -> Result<AcmeAccount, FleetError> {
            Ok(account.clone())
        }
    }

    /// A CA that rate-limits account creation: its directory, a nonce, and `429` with
    /// `Retry-After: 3600` and a `rateLimited` problem for anything posted.
    async fn rate_limiting_ca() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let directory = serde_json::json!({
            "newNonce": format!("{base}/nonce"),
            "newAccount": format!("{base}/account"),
            "newOrder": format!("{base}/order"),
        })
        .to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let directory = directory.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // The head, then as much body as it announces.
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&request).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(str::to_string)
                                })
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if request.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    let head = String::from_utf8_lossy(&request).to_string();
                    let answer = if head.starts_with("GET /directory") {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{directory}",
                            directory.len()
                        )
                    } else if head.contains(" /nonce ") {
                        "HTTP/1.1 200 OK\r\nreplay-nonce: bm9uY2U\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_string()
                    } else {
                        let problem = r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many new accounts","status":429}"#;
                        format!(
                            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/problem+json\r\nreplay-nonce: bm9uY2Uy\r\nretry-after: 3600\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{problem}",
                            problem.len()
                        )
                    };
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        format!("{base}/directory")
    }

    #[tokio::test]
    async fn a_rate_limit_reports_the_cas_retry_after() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let directory = rate_limiting_ca().await;
        let issuer = AcmeIssuer::new(None, Arc::new(ChallengeStore::default()));
        let err = issuer
            .issue(&NoAccount(directory), "shop.example.test")
            .await
            .expect_err("the CA refuses");
        assert!(!err.is_transient(), "{err}");
        let failure = issuer.failure(&err);
        assert!(failure.rate_limited, "{failure:?}");
        assert!(failure.message.contains("too many new accounts"), "{failure:?}");
        let wait = failure.retry_after_secs.expect("the CA's Retry-After");
        assert!((3590..=3600).contains(&wait), "{failure:?}");
        // Taken once: a later failure without a Retry-After does not reuse it.
        assert_eq!(issuer.failure(&err).retry_after_secs, None);
    }
}
