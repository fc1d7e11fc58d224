//! The ingress's own answers: tiny static HTML pages for hosts it cannot serve.
//!
//! Every piece of request data in a page (only the host name) goes through [`escape`]. Pages
//! say what is wrong and nothing about the pod beyond its state: they are public to anyone who
//! knows the host name, so a pod's failure reason (which can name images and registries) stays
//! in the API.

use instapod_common::node::NodePodState;

use super::routes::Unavailable;

/// A page: status line material plus the HTML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub status: u16,
    /// Seconds for `Retry-After`, when trying again soon is likely to work.
    pub retry_after_secs: Option<u32>,
    pub html: String,
}

/// Seconds a client is told to wait for a pod that is starting or restarting.
const RETRY_AFTER_SECS: u32 = 5;

/// 404: no pod has this host name.
pub fn not_found(host: &str) -> Page {
    page(
        404,
        None,
        "No pod here",
        &format!("No pod answers to <b>{}</b>.", escape(host)),
    )
}

/// 400: the request has no usable `Host`.
pub fn bad_host() -> Page {
    page(400, None, "Bad request", "The request does not name a valid host.")
}

/// 400: a request the ingress does not forward (CONNECT, `OPTIONS *`).
pub fn unsupported_request() -> Page {
    page(
        400,
        None,
        "Bad request",
        "This kind of request is not forwarded to pods.",
    )
}

/// 503: the host's pod cannot take requests (on this node, or its node is out of reach).
pub fn unavailable(host: &str, why: Unavailable) -> Page {
    let host = escape(host);
    match why {
        Unavailable::NotRunning { state, coming_back } => {
            let text = match state {
                NodePodState::Starting => "is starting",
                NodePodState::Running => "is running",
                NodePodState::Stopped => "is stopped",
                NodePodState::Exited if coming_back => "has exited and is being restarted",
                NodePodState::Exited => "has exited",
                NodePodState::Failed => "has failed",
                NodePodState::Deleted => "has been deleted",
            };
            page(
                503,
                coming_back.then_some(RETRY_AFTER_SECS),
                &format!("This pod {text}"),
                &format!(
                    "The pod behind <b>{host}</b> {text} (state: <code>{}</code>).",
                    state.as_str()
                ),
            )
        }
        Unavailable::NoHttpEndpoint => page(
            503,
            None,
            "This pod does not serve HTTP",
            &format!("The pod behind <b>{host}</b> has no HTTP port."),
        ),
        Unavailable::NotPlaced => page(
            503,
            Some(RETRY_AFTER_SECS),
            "This pod is waiting for a node",
            &format!("The pod behind <b>{host}</b> is not running on any node yet."),
        ),
        Unavailable::NodeUnreachable => page(
            503,
            Some(RETRY_AFTER_SECS),
            "This pod's node is unreachable",
            &format!("The node running the pod behind <b>{host}</b> is not answering the fleet right now."),
        ),
    }
}

/// 502: the node running the host's pod did not answer a forwarded request.
pub fn node_did_not_answer(host: &str) -> Page {
    page(
        502,
        Some(RETRY_AFTER_SECS),
        "The pod's node did not answer",
        &format!(
            "The pod behind <b>{}</b> runs on another node, which refused or dropped the connection.",
            escape(host)
        ),
    )
}

/// 502: the pod (or the node it runs on) did not answer.
pub fn bad_gateway(host: &str) -> Page {
    page(
        502,
        None,
        "The pod did not answer",
        &format!(
            "The pod behind <b>{}</b> is running but refused or dropped the connection. \
             Is it listening on its HTTP port?",
            escape(host)
        ),
    )
}

/// 502: a forwarded request that would be forwarded again (the nodes disagree about where the
/// pod runs).
pub fn misrouted(host: &str) -> Page {
    page(
        502,
        Some(RETRY_AFTER_SECS),
        "The pod is moving",
        &format!(
            "The nodes do not agree yet where the pod behind <b>{}</b> runs. Try again shortly.",
            escape(host)
        ),
    )
}

fn page(status: u16, retry_after_secs: Option<u32>, title: &str, body: &str) -> Page {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;\
         padding:0 1rem;color:#222}}small{{color:#777}}</style></head>\n\
         <body><h1>{title}</h1><p>{body}</p><p><small>{status} · Instapod</small></p></body></html>\n"
    );
    Page {
        status,
        retry_after_secs,
        html,
    }
}

/// HTML-escapes text for element content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        let page = not_found("<script>alert(1)</script>");
        assert!(!page.html.contains("<script>"), "{}", page.html);
        assert!(page.html.contains("&lt;script&gt;"), "{}", page.html);
        assert_eq!(page.status, 404);
    }

    #[test]
    fn unavailable_pages_name_the_state_and_retry_only_when_coming_back() {
        let check = |state, coming_back, words: &str, retry: Option<u32>| {
            let page = unavailable("web.apps.test", Unavailable::NotRunning { state, coming_back });
            assert_eq!(page.status, 503);
            assert!(page.html.contains(words), "{words:?} not in {}", page.html);
            assert!(page.html.contains(state.as_str()), "{}", page.html);
            assert_eq!(page.retry_after_secs, retry, "{state:?}");
        };
        check(NodePodState::Stopped, false, "This pod is stopped", None);
        check(
            NodePodState::Starting,
            true,
            "This pod is starting",
            Some(RETRY_AFTER_SECS),
        );
        check(
            NodePodState::Exited,
            true,
            "has exited and is being restarted",
            Some(RETRY_AFTER_SECS),
        );
        check(NodePodState::Failed, false, "This pod has failed", None);
    }
}
