//! Checks of the harness itself, independent of the control plane: Postgres and Redis start,
//! fresh databases are isolated, dedicated servers can be stopped, and the SMTP sink records
//! what a plain SMTP client sends.

use std::time::Duration;

use instapod_tests::{PostgresServer, RedisServer, SmtpSink, postgres, redis};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn redis_ping(port: u16) -> std::io::Result<String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (read_half, mut write_half) = stream.into_split();
    write_half.write_all(b"PING\r\n").await?;
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    Ok(line)
}

#[tokio::test]
async fn shared_postgres_creates_isolated_databases() {
    let server = postgres::shared();
    let first = server.create_database().await;
    let second = server.create_database().await;
    assert_ne!(first, second);

    let db = server.connect(&first).await;
    db.batch_execute("CREATE TABLE marker (id int); INSERT INTO marker VALUES (7)")
        .await
        .expect("writing to a fresh database");
    let row = db.query_one("SELECT id FROM marker", &[]).await.expect("reading back");
    assert_eq!(row.get::<_, i32>(0), 7);

    let other = server.connect(&second).await;
    let missing = other.query("SELECT id FROM marker", &[]).await;
    assert!(missing.is_err(), "the second database must not see the first's table");

    let gen_uuid = db
        .query_one("SELECT gen_random_uuid()::text", &[])
        .await
        .expect("gen_random_uuid is built in");
    assert_eq!(gen_uuid.get::<_, String>(0).len(), 36);
}

#[tokio::test]
async fn shared_redis_answers_and_hands_out_distinct_databases() {
    let server = redis::shared();
    assert_eq!(redis_ping(server.port()).await.expect("redis answers"), "+PONG\r\n");
    let first = server.next_url();
    let second = server.next_url();
    assert_ne!(first, second);
    assert!(first.starts_with(&format!("redis://127.0.0.1:{}/", server.port())));
}

#[tokio::test]
async fn dedicated_servers_can_be_stopped() {
    let redis_server = RedisServer::start();
    let port = redis_server.port();
    assert!(redis_ping(port).await.is_ok());
    redis_server.stop();
    assert!(
        redis_ping(port).await.is_err(),
        "a stopped Redis must refuse connections"
    );

    let pg = PostgresServer::start();
    let url = pg.url("postgres");
    let client = pg.connect("postgres").await;
    client
        .batch_execute("SELECT 1")
        .await
        .expect("the dedicated postgres answers");
    pg.stop();
    let after = tokio_postgres::connect(&url, tokio_postgres::NoTls).await;
    assert!(after.is_err(), "a stopped Postgres must refuse connections");
}

#[tokio::test]
async fn smtp_sink_records_a_message() {
    let sink = SmtpSink::start().await;
    let port: u16 = sink
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the sink URL ends with a port");
    let stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect to sink");
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    let mut transcript = Vec::new();
    let mut line = String::new();
    reader.read_line(&mut line).await.expect("greeting");
    transcript.push(line.clone());
    for command in [
        "EHLO client.test\r\n",
        "MAIL FROM:<noreply@instapod.test>\r\n",
        "RCPT TO:<someone@example.test>\r\n",
        "DATA\r\n",
        "Subject: Verify\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nhttp://x/verify-email?token=3Dipv_a=\r\nbc\r\n..dot line\r\n.\r\n",
        "QUIT\r\n",
    ] {
        write_half.write_all(command.as_bytes()).await.expect("write command");
        line.clear();
        reader.read_line(&mut line).await.expect("reply");
        transcript.push(line.clone());
    }
    let codes: Vec<&str> = transcript.iter().map(|reply| &reply[..3]).collect();
    assert_eq!(codes, ["220", "250", "250", "250", "354", "250", "221"]);

    let message = sink
        .wait_for_message_to("someone@example.test", Duration::from_secs(5))
        .await;
    assert_eq!(message.mail_from, "noreply@instapod.test");
    assert_eq!(message.header("Subject").as_deref(), Some("Verify"));
    let text = message.text();
    assert!(text.contains("verify-email?token=ipv_abc"), "{text}");
    assert!(text.contains("\n.dot line"), "dot-unstuffing: {text}");
}
