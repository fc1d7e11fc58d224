//! The server side of one TLS connection at the ingress: rustls over a tokio `TcpStream`,
//! writing to the socket only when the client needs the bytes.
//!
//! *Why not tokio-rustls.* Its stream writes whatever rustls has queued as soon as it can: the
//! session ticket right after the handshake (its own segment and wake-up of the client), every
//! `poll_write`, then `close_notify` and the FIN each on their own. For a client that opens a
//! connection per request that is five segments from the ingress where two carry everything.
//!
//! *Design.* [`accept`] writes the handshake's flights as the handshake needs them; with TLS 1.3
//! what rustls queues once the handshake is complete (the session ticket) is kept and leaves
//! with the first answer. [`ServerStream::poll_write`] only encrypts into rustls's buffer (the
//! socket is written when that buffer is full); [`ServerStream::poll_flush`] sends everything
//! queued in one `send`. When the connection's [`LastAnswer`] is marked, the flush is the
//! connection's last: `close_notify` is queued behind the answer, the bytes go with `MSG_MORE`
//! and the write side is shut down at once, so answer, alert and FIN leave as one segment;
//! [`ServerStream::poll_shutdown`] does the same for an ordinary end.
//!
//! *Invariants.* A flush returns only when everything queued before it is in the socket (a
//! streamed answer is never held back). A client that does not read holds the writer back with
//! at most two buffers' worth (rustls's 64 KiB and what it left unsent) in memory. Nothing is
//! written after `close_notify`. A TLS error from the client gets rustls's alert (best effort)
//! and ends the stream with `InvalidData`.
//! A client closing its TCP connection without `close_notify` reads as the end of the stream
//! (the HTTP framing tells a cut answer from a whole one).

use std::future::poll_fn;
use std::io::{self, BufRead, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::{ProtocolVersion, ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::ingress::last_answer::LastAnswer;

/// What the stream's outgoing buffer starts with, and keeps between flushes: room for a
/// handshake flight or a small answer without growing it.
const OUT_CAPACITY: usize = 4 << 10;

/// One TLS connection from a client, handshake done.
#[derive(Debug)]
pub struct ServerStream {
    tcp: TcpStream,
    tls: ServerConnection,
    /// Encrypted bytes taken from rustls, `out[sent..]` not yet accepted by the socket.
    out: Vec<u8>,
    sent: usize,
    last: Arc<LastAnswer>,
    /// `close_notify` queued: nothing more is written.
    closing: bool,
    /// The write side is shut down.
    shut: bool,
    /// Answer bytes handed to rustls since the last flush.
    unflushed: bool,
    /// The session ticket is held for the first answer and the client's `Finished` has not
    /// been acknowledged by anything the server sent (see [`ServerStream::poll_read`]).
    ack_owed: bool,
}

/// Runs the server handshake on `tcp`. `last` is the mark the connection's HTTP service sets
/// when its last answer has been handed over (see [`LastAnswer`]).
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream, last: Arc<LastAnswer>) -> io::Result<ServerStream> {
    let tls = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut stream = ServerStream {
        tcp,
        tls,
        out: Vec::with_capacity(OUT_CAPACITY),
        sent: 0,
        last,
        closing: false,
        shut: false,
        unflushed: false,
        ack_owed: false,
    };
    while stream.tls.is_handshaking() {
        if stream.tls.wants_write() {
            poll_fn(|cx| stream.poll_send(cx, false)).await?;
        }
        if stream.tls.is_handshaking() && poll_fn(|cx| stream.poll_read_tls(cx)).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed during the handshake",
            ));
        }
    }
    // TLS 1.2 ends with the server's Finished, which the client waits for; TLS 1.3 leaves only
    // the session ticket, which goes with the first answer.
    if stream.tls.protocol_version() == Some(ProtocolVersion::TLSv1_3) {
        stream.ack_owed = stream.tls.wants_write();
    } else {
        poll_fn(|cx| stream.poll_send(cx, false)).await?;
    }
    Ok(stream)
}

impl ServerStream {
    /// The negotiated connection (SNI, ALPN, protocol version).
    pub fn connection(&self) -> &ServerConnection {
        &self.tls
    }

    /// Reads what the socket has into rustls and processes it; `Ok(0)` at the end of the TCP
    /// stream. A TLS error sends rustls's alert if the socket takes it at once.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let read = self.tls.read_tls(&mut SocketReader { tcp: &mut self.tcp, cx });
        let n = match read {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            other => other?,
        };
        if let Err(err) = self.tls.process_new_packets() {
            let _ = self.poll_send(cx, false);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, err)));
        }
        Poll::Ready(Ok(n))
    }

    /// Sends everything rustls has queued, in as few `send`s as the socket allows. `more`:
    /// the caller shuts the write side down right after, so the kernel may hold the bytes to
    /// send them with the FIN (`MSG_MORE`).
    fn poll_send(&mut self, cx: &mut Context<'_>, more: bool) -> Poll<io::Result<()>> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.out)?;
        }
        while self.sent < self.out.len() {
            let pending = &self.out[self.sent..];
            let n = if more {
                ready!(self.tcp.poll_write_ready(cx))?;
                let tcp = &self.tcp;
                let flags = rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL;
                match tcp.try_io(Interest::WRITABLE, || Ok(rustix::net::send(tcp, pending, flags)?)) {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    other => other?,
                }
            } else {
                ready!(Pin::new(&mut self.tcp).poll_write(cx, pending))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if !self.out.is_empty() {
            self.ack_owed = false;
        }
        self.out.clear();
        if self.out.capacity() > 4 * OUT_CAPACITY {
            // A large answer grew it: an idle keep-alive connection does not keep that.
            self.out = Vec::with_capacity(OUT_CAPACITY);
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Queues `close_notify`, sends everything with it and shuts the write side down.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closing {
            self.tls.send_close_notify();
            self.closing = true;
        }
        ready!(self.poll_send(cx, true))?;
        if !self.shut {
            match ready!(Pin::new(&mut self.tcp).poll_shutdown(cx)) {
                Err(err) if err.kind() != io::ErrorKind::NotConnected => return Poll::Ready(Err(err)),
                _ => self.shut = true,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Hands plaintext to rustls, first sending what an earlier full buffer left unsent and,
    /// when rustls's buffer is full, what it holds: a client that reads slowly holds the
    /// writer back, at most rustls's buffer (64 KiB) plus one buffer's worth in `out`.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&mut rustls::Writer<'_>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        if self.closing {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS stream is closed",
            )));
        }
        if self.sent < self.out.len() {
            ready!(self.poll_send(cx, false))?;
        }
        loop {
            let n = write(&mut self.tls.writer())?;
            if n > 0 {
                self.unflushed = true;
                return Poll::Ready(Ok(n));
            }
            // `out` is empty here: the guard above and every completed send leave it so.
            if !self.tls.wants_write() {
                return Poll::Ready(Ok(0));
            }
            ready!(self.poll_send(cx, false))?;
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut reader = this.tls.reader();
            // Copied from rustls's buffer into the caller's, which need not be initialised.
            match reader.fill_buf() {
                Ok(chunk) => {
                    let n = chunk.len().min(buf.remaining());
                    buf.put_slice(&chunk[..n]);
                    reader.consume(n);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                // The client closed without close_notify: the end of the stream.
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(())),
                Err(err) => return Poll::Ready(Err(err)),
            }
            let read = this.poll_read_tls(cx);
            if read.is_pending() && this.ack_owed {
                // Nothing the client sent after its `Finished` is here yet. The ticket that
                // would have acknowledged the `Finished` is held back, and a client with
                // Nagle's algorithm on waits for that acknowledgement before it sends its
                // request (a delayed ACK: 40 ms): acknowledge now, in a bare ACK.
                this.ack_owed = false;
                let _ = rustix::net::sockopt::set_tcp_quickack(&this.tcp, true);
            }
            if ready!(read)? == 0 {
                // rustls now answers the read with the end of the stream (or its error).
                continue;
            }
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |writer| writer.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |writer| writer.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing || this.last.is_marked() {
            return this.poll_close(cx);
        }
        // hyper flushes before it has written anything too: what rustls queued on its own
        // (the session ticket) waits for the answer.
        if !this.unflushed {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send(cx, false))?;
        this.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_close(cx)
    }
}

/// The socket as rustls reads it: `WouldBlock` while nothing has arrived (the task is woken
/// when something does).
struct SocketReader<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for SocketReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.tcp).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(err)) => Err(err),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::domains::Served;
    use crate::domains::tls::tests::{self_signed, served};
    use crate::domains::tls::{SniResolver, server_config};

    const NAME: &str = "shop.example.com";
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";

    /// A TLS listener serving [`NAME`] with the ingress's configuration, a client trusting it
    /// (one session cache for all its connections), and the roots it trusts.
    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>, rustls::RootCertStore) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let cert = self_signed(&[NAME]);
        let domains = Arc::new(Served::default());
        domains.apply(&served(&[(NAME, Some(&cert))]));
        let server = server_config(Arc::new(SniResolver::new(domains, None))).expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(cert.0.as_bytes()) {
            roots.add(der.expect("PEM")).expect("a root");
        }
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        (server, Arc::new(client), roots)
    }

    async fn connect(
        client: &Arc<rustls::ClientConfig>,
        addr: std::net::SocketAddr,
        nodelay: bool,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(nodelay).expect("nodelay");
        let name = ServerName::try_from(NAME).expect("a name");
        tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .expect("handshake")
    }

    /// Reads one request head from the stream.
    async fn read_head(stream: &mut ServerStream) -> Vec<u8> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                stream.read(&mut byte).await.expect("read"),
                1,
                "the request ended early"
            );
            head.push(byte[0]);
        }
        head
    }

    /// What the test server tells the test: the handshake is done, the answer is flushed.
    #[derive(Debug, PartialEq)]
    enum Step {
        Accepted,
        Flushed,
    }

    #[tokio::test]
    async fn the_ticket_waits_for_the_answer_and_the_last_answer_ends_the_connection_with_its_flush() {
        let (server, client, _) = configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (steps_tx, mut steps) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<()>();
        let serving = tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                let last = Arc::new(LastAnswer::default());
                let mut stream = accept(server.clone(), tcp, last.clone()).await.expect("handshake");
                let _ = steps_tx.send(Step::Accepted);
                heads.push(read_head(&mut stream).await);
                last.mark();
                stream.write_all(ANSWER).await.expect("write");
                stream.flush().await.expect("flush");
                let _ = steps_tx.send(Step::Flushed);
                // The stream stays open (no shutdown, no drop) until the client has read it.
                let _ = done.recv().await;
            }
            heads
        });

        for round in 0..2 {
            let mut tls = connect(&client, addr, true).await;
            assert_eq!(steps.recv().await, Some(Step::Accepted));
            // The handshake is over on both sides, and the session ticket has not been sent.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut probe = [0u8; 64];
            let early = tls.get_ref().0.try_read(&mut probe);
            assert!(
                matches!(&early, Err(err) if err.kind() == io::ErrorKind::WouldBlock),
                "nothing before the answer: {early:?}"
            );
            let expected = if round == 0 {
                rustls::HandshakeKind::Full
            } else {
                // The first connection's ticket came with its answer.
                rustls::HandshakeKind::Resumed
            };
            assert_eq!(tls.get_ref().1.handshake_kind(), Some(expected));

            tls.write_all(b"GET / HTTP/1.1\r\nhost: shop.example.com\r\nconnection: close\r\n\r\n")
                .await
                .expect("request");
            assert_eq!(steps.recv().await, Some(Step::Flushed));
            // The flush alone ended the connection: answer, close_notify (a clean end, not an
            // error) and FIN are all there.
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer))
                .await
                .expect("the connection ended with the flush")
                .expect("a clean TLS end");
            assert_eq!(answer, ANSWER);
            let _ = done_tx.send(());
        }
        let heads = serving.await.expect("server task");
        assert!(heads.iter().all(|head| head.starts_with(b"GET / HTTP/1.1\r\n")));
    }

    /// Serves `connections` connections on a new listener (its address is returned): each
    /// answers [`ANSWER`] to `requests` requests (flushing each, never marking the last) and
    /// then shuts the stream down.
    async fn serve_keep_alive(
        server: Arc<ServerConfig>,
        connections: usize,
        requests: usize,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let serving = tokio::spawn(async move {
            for _ in 0..connections {
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut stream = accept(server.clone(), tcp, Arc::default()).await.expect("handshake");
                for _ in 0..requests {
                    read_head(&mut stream).await;
                    stream.write_all(ANSWER).await.expect("write");
                    stream.flush().await.expect("flush");
                }
                stream.shutdown().await.expect("shutdown");
            }
        });
        (addr, serving)
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: shop.example.com\r\n\r\n";

    /// Sends [`REQUEST`] and reads [`ANSWER`] back.
    async fn ask(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) {
        tls.write_all(REQUEST).await.expect("request");
        let mut answer = vec![0u8; ANSWER.len()];
        tls.read_exact(&mut answer).await.expect("an answer");
        assert_eq!(answer, ANSWER);
    }

    /// Reads to the end: a `close_notify` and nothing after it.
    async fn expect_clean_end(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) {
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await.expect("close_notify, then the end");
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[tokio::test]
    async fn an_unmarked_flush_keeps_the_connection_and_shutdown_ends_it_cleanly() {
        let (server, client, _) = configs();
        let (addr, serving) = serve_keep_alive(server, 1, 3).await;
        let mut tls = connect(&client, addr, true).await;
        for _ in 0..3 {
            ask(&mut tls).await;
        }
        expect_clean_end(&mut tls).await;
        serving.await.expect("server task");
    }

    /// A client with Nagle's algorithm on sends its request only once its `Finished` is
    /// acknowledged; the ticket that used to acknowledge it now waits for the answer, so the
    /// stream acknowledges it itself. Without that every connection of such a client waits for
    /// the server's delayed ACK (40 ms or more on Linux) before its first request.
    #[tokio::test]
    async fn a_client_with_nagle_on_is_not_held_back_by_the_deferred_ticket() {
        let (server, client, _) = configs();
        const CONNECTIONS: usize = 5;
        let (addr, serving) = serve_keep_alive(server, CONNECTIONS, 1).await;
        let mut waits = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut tls = connect(&client, addr, false).await;
            let started = Instant::now();
            ask(&mut tls).await;
            waits.push(started.elapsed());
            expect_clean_end(&mut tls).await;
        }
        serving.await.expect("server task");
        waits.sort();
        let median = waits[CONNECTIONS / 2];
        assert!(median < Duration::from_millis(20), "request to answer: {waits:?}");
    }

    #[tokio::test]
    async fn a_client_that_reads_slowly_holds_the_writer_back() {
        const TOTAL: usize = 16 << 20;
        const CHUNK: usize = 16 << 10;
        let (server, client, _) = configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut stream = accept(server, tcp, Arc::default()).await.expect("handshake");
            let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
            let mut most_unsent = 0;
            for _ in 0..TOTAL / CHUNK {
                stream.write_all(&chunk).await.expect("write");
                most_unsent = most_unsent.max(stream.out.len() - stream.sent);
            }
            stream.shutdown().await.expect("shutdown");
            most_unsent
        });
        let mut tls = connect(&client, addr, true).await;
        let mut received = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        let slow_until = Instant::now() + Duration::from_millis(300);
        loop {
            // A slow reader first (4 KiB a millisecond), then a fast one.
            let want = if Instant::now() < slow_until {
                4 << 10
            } else {
                buf.len()
            };
            let n = tls.read(&mut buf[..want]).await.expect("read");
            if n == 0 {
                break;
            }
            for (offset, byte) in buf[..n].iter().enumerate() {
                assert_eq!(*byte, ((received + offset) % CHUNK % 251) as u8);
            }
            received += n;
            if Instant::now() < slow_until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(received, TOTAL);
        let most_unsent = serving.await.expect("server task");
        // A write is taken only once what earlier ones left unsent is in the socket: the stream
        // holds at most rustls's buffer (64 KiB of records) on top of the socket's.
        assert_eq!(
            most_unsent, 0,
            "bytes of earlier writes still waited when a write was taken"
        );
    }

    #[tokio::test]
    async fn a_tls_1_2_client_gets_its_answers_and_resumes() {
        let (server, _, roots) = configs();
        let tls12 = Arc::new(
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let (addr, serving) = serve_keep_alive(server, 2, 2).await;
        for expected in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
            let mut tls = connect(&tls12, addr, true).await;
            assert_eq!(tls.get_ref().1.protocol_version(), Some(ProtocolVersion::TLSv1_2));
            assert_eq!(tls.get_ref().1.handshake_kind(), Some(expected));
            for _ in 0..2 {
                ask(&mut tls).await;
            }
            expect_clean_end(&mut tls).await;
        }
        serving.await.expect("server task");
    }
}
