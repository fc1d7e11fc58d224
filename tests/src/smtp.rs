//! A minimal SMTP server that accepts every message and keeps it, so a test can check that
//! mail really leaves the control plane over SMTP.
//!
//! It speaks just enough of RFC 5321 for a plain-text client on loopback: a `220` greeting,
//! `EHLO`/`HELO`, `MAIL`, `RCPT`, `RSET`, `NOOP` → `250`, `DATA` → `354` and then everything up
//! to the line `.` → `250`, `QUIT` → `221`. It advertises no extensions (no STARTTLS, no AUTH).
//! Received messages can be decoded ([`SmtpMessage::text`]): quoted-printable and base64 bodies
//! and multipart messages are handled, since mail libraries encode long lines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::eventually::eventually;

/// One message as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpMessage {
    /// The `MAIL FROM` address (without angle brackets).
    pub mail_from: String,
    /// The `RCPT TO` addresses.
    pub rcpt_to: Vec<String>,
    /// The raw message (headers and body) after dot-unstuffing, with CRLF line ends.
    pub data: String,
}

impl SmtpMessage {
    /// The value of the first top-level header `name` (unfolded), if any.
    pub fn header(&self, name: &str) -> Option<String> {
        let (headers, _) = split_entity(&self.data);
        header_value(&headers, name)
    }

    /// The decoded text of the message: every `text/*` part, transfer-decoded, joined.
    pub fn text(&self) -> String {
        decode_entity(&self.data)
    }
}

/// A running sink; dropping it stops accepting connections.
#[derive(Debug)]
pub struct SmtpSink {
    port: u16,
    messages: Arc<Mutex<Vec<SmtpMessage>>>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    /// Listens on a free port of 127.0.0.1, serving connections on the current runtime.
    pub async fn start() -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0 never fails");
        let port = listener.local_addr().expect("a bound listener has an address").port();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let store = messages.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    // A client that drops the connection just ends its session.
                    let _ = serve(stream, store).await;
                });
            }
        });
        SmtpSink { port, messages, task }
    }

    /// `smtp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<SmtpMessage> {
        self.messages.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for a message with `to` among its recipients.
    pub async fn wait_for_message_to(&self, to: &str, timeout: Duration) -> SmtpMessage {
        eventually(timeout, &format!("an SMTP message to {to}"), || async {
            self.messages()
                .into_iter()
                .find(|message| message.rcpt_to.iter().any(|rcpt| rcpt == to))
                .ok_or_else(|| anyhow!("{} message(s) received, none to {to}", self.messages().len()))
        })
        .await
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The address inside `<...>` after the command's colon.
fn address_of(argument: &str) -> String {
    let after_colon = argument.split_once(':').map_or(argument, |(_, rest)| rest);
    after_colon
        .trim()
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or_default()
        .to_string()
}

async fn serve(stream: TcpStream, store: Arc<Mutex<Vec<SmtpMessage>>>) -> std::io::Result<()> {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    write_half.write_all(b"220 instapod-test-sink ESMTP\r\n").await?;
    let mut mail_from = String::new();
    let mut rcpt_to = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_string();
        let verb = command
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 instapod-test-sink\r\n",
            "MAIL" => {
                mail_from = address_of(&command);
                rcpt_to.clear();
                b"250 OK\r\n"
            }
            "RCPT" => {
                rcpt_to.push(address_of(&command));
                b"250 OK\r\n"
            }
            "RSET" => {
                mail_from.clear();
                rcpt_to.clear();
                b"250 OK\r\n"
            }
            "NOOP" => b"250 OK\r\n",
            "DATA" => {
                write_half.write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n").await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    let content = line.trim_end_matches(['\r', '\n']);
                    if content == "." {
                        break;
                    }
                    let unstuffed = content.strip_prefix('.').unwrap_or(content);
                    data.push_str(unstuffed);
                    data.push_str("\r\n");
                }
                store.lock().unwrap_or_else(|p| p.into_inner()).push(SmtpMessage {
                    mail_from: std::mem::take(&mut mail_from),
                    rcpt_to: std::mem::take(&mut rcpt_to),
                    data,
                });
                b"250 OK queued\r\n"
            }
            "QUIT" => {
                write_half.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 command not implemented\r\n",
        };
        write_half.write_all(reply).await?;
    }
}

/// Splits a MIME entity into its (unfolded) header lines and its body.
fn split_entity(entity: &str) -> (Vec<String>, String) {
    let normalized = entity.replace("\r\n", "\n");
    let (head, body) = normalized.split_once("\n\n").unwrap_or((normalized.as_str(), ""));
    let mut headers: Vec<String> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else {
            headers.push(line.to_string());
        }
    }
    (headers, body.to_string())
}

fn header_value(headers: &[String], name: &str) -> Option<String> {
    headers.iter().find_map(|header| {
        let (key, value) = header.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
    })
}

/// The value of parameter `name` in a header such as `multipart/alternative; boundary="x"`.
fn header_parameter(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|parameter| {
        let (key, value) = parameter.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().trim_matches('"').to_string())
    })
}

fn decode_entity(entity: &str) -> String {
    let (headers, body) = split_entity(entity);
    let content_type = header_value(&headers, "content-type").unwrap_or_else(|| "text/plain".into());
    if content_type.to_ascii_lowercase().starts_with("multipart/") {
        let Some(boundary) = header_parameter(&content_type, "boundary") else {
            return body;
        };
        let delimiter = format!("--{boundary}");
        return body
            .split(&delimiter)
            .skip(1)
            .take_while(|part| !part.starts_with("--"))
            .map(|part| decode_entity(part.trim_start_matches('\n')))
            .collect::<Vec<_>>()
            .join("\n");
    }
    if !content_type.to_ascii_lowercase().starts_with("text/") {
        return String::new();
    }
    let encoding = header_value(&headers, "content-transfer-encoding")
        .unwrap_or_default()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "quoted-printable" => decode_quoted_printable(&body),
        "base64" => {
            let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or(body)
        }
        _ => body,
    }
}

/// Decodes quoted-printable text (RFC 2045 §6.7): `=XX` escapes and `=` soft line breaks.
pub fn decode_quoted_printable(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'=' {
            if bytes.get(index + 1) == Some(&b'\n') {
                index += 2;
                continue;
            }
            if bytes.get(index + 1) == Some(&b'\r') && bytes.get(index + 2) == Some(&b'\n') {
                index += 3;
                continue;
            }
            let hex = bytes
                .get(index + 1..index + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok());
            if let Some(byte) = hex {
                out.push(byte);
                index += 3;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_quoted_printable_soft_breaks_and_escapes() {
        let encoded = "http://x/verify-email?token=3Dipv_abc=\r\ndef caf=C3=A9\r\n";
        assert_eq!(
            decode_quoted_printable(encoded),
            "http://x/verify-email?token=ipv_abcdef café\r\n"
        );
    }

    #[test]
    fn decodes_multipart_base64_text() {
        let message = SmtpMessage {
            mail_from: "a@b".into(),
            rcpt_to: vec!["c@d".into()],
            data: "Subject: hi\r\nContent-Type: multipart/alternative;\r\n boundary=\"XX\"\r\n\r\n\
                   --XX\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n\
                   aGVsbG8gd29ybGQ=\r\n--XX--\r\n"
                .into(),
        };
        assert_eq!(message.header("subject").as_deref(), Some("hi"));
        assert!(message.text().contains("hello world"), "{}", message.text());
    }
}
