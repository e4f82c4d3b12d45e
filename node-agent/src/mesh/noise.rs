//! Mesh link security: the Noise protocol framework (`snow`), pattern XX
//! with X25519, ChaCha20-Poly1305 and BLAKE2s, over the link's WebSocket.
//!
//! Each agent has a static key of its own (generated on the node, never
//! leaving it) and knows the public key of every peer it may link with. The
//! dialer checks that the key behind the address it dialed is the peer's it
//! meant; the acceptor checks that the dialer's key is the key of the node
//! it names. Every message after the handshake is encrypted and
//! authenticated under keys bound to that handshake, with an implicit
//! per-direction counter as nonce, so a frame cannot be forged, replayed,
//! reordered or moved to another link. An optional pre-shared key (the
//! chart's mesh secret) is mixed in as `XXpsk3`: a second lock, not the
//! identity.
//!
//! On the wire every WebSocket message is one Noise message of at most
//! [`MAX_WIRE_MESSAGE`] bytes; a link frame (a publish may be megabytes)
//! travels as a run of them, each with a flag byte (final, binary) before
//! its chunk of plaintext. So the WebSocket reader never buffers more than a
//! few KiB per message, before authentication or after.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use sha2::{Digest, Sha256};
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::{Builder, StatelessTransportState};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
const PATTERN_PSK: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake hash: a peer speaking another protocol (or
/// another version of this one) fails the handshake instead of misreading it.
const PROLOGUE: &[u8] = b"edgewire mesh link v1";
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// The largest WebSocket message a mesh link carries, before and after
/// authentication.
pub const MAX_WIRE_MESSAGE: usize = 4096;
/// The most plaintext one wire message carries: a link frame up to this
/// size costs one encryption and one WebSocket frame.
pub const CHUNK: usize = MAX_WIRE_MESSAGE - TAG_LEN - 1;
const FINAL: u8 = 1;
const BINARY: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the mesh key {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the mesh key {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("the mesh key {0} is not a hex-encoded 32-byte X25519 private key")]
    Invalid(PathBuf),
    #[error("the OS random source failed: {0}")]
    Random(getrandom::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the link closed during the handshake")]
    Closed,
    #[error("the peer sent something other than a handshake message")]
    Unexpected,
    #[error("the handshake failed: {0}")]
    Noise(#[from] snow::Error),
    #[error("the key behind this address is not {0}'s")]
    WrongPeer(String),
    #[error("{0:?} is not a peer here with the key it showed")]
    UnknownPeer(String),
    #[error("cannot write: {0}")]
    Write(WsError),
}

/// This node's static X25519 key pair.
pub struct StaticKey {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKey")
            .field("public", &hex(&self.public))
            .finish_non_exhaustive()
    }
}

impl StaticKey {
    pub fn from_private(private: [u8; KEY_LEN]) -> StaticKey {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("the default resolver has X25519");
        dh.set(&private);
        let mut public = [0u8; KEY_LEN];
        public.copy_from_slice(dh.pubkey());
        StaticKey { private, public }
    }

    pub fn generate() -> Result<StaticKey, KeyError> {
        let mut private = [0u8; KEY_LEN];
        getrandom::fill(&mut private).map_err(KeyError::Random)?;
        Ok(StaticKey::from_private(private))
    }

    /// Reads the key at `path` (hex, one line), or makes one there, readable
    /// by the owner only, if there is none. Two processes making it at once
    /// end up with the same key: the first one written.
    pub fn load_or_create(path: &Path) -> Result<StaticKey, KeyError> {
        match StaticKey::load(path) {
            Err(KeyError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let key = StaticKey::generate()?;
                let ours = write_new(path, &key.private).map_err(|source| KeyError::Write {
                    path: path.to_path_buf(),
                    source,
                })?;
                if ours { Ok(key) } else { StaticKey::load(path) }
            }
            loaded => loaded,
        }
    }

    fn load(path: &Path) -> Result<StaticKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parse_key(text.trim())
            .map(StaticKey::from_private)
            .ok_or_else(|| KeyError::Invalid(path.to_path_buf()))
    }

    pub fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// The public key as peers' configs and EdgeNodes name it.
    pub fn public_hex(&self) -> String {
        hex(&self.public)
    }
}

/// Writes a new key file unless one exists: to a temporary file first, mode
/// 0600, then linked into place (which never replaces a file), so a crash
/// never leaves half a key behind and a key once there is never changed.
/// Whether ours is the one in place.
fn write_new(path: &Path, private: &[u8; KEY_LEN]) -> io::Result<bool> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(format!("{}\n", hex(private)).as_bytes())?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(err),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_key(text: &str) -> Option<[u8; KEY_LEN]> {
    if text.len() != KEY_LEN * 2 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// A peer's public key as written in a config or an EdgeNode (64 hex digits).
pub fn parse_public(text: &str) -> Option<[u8; KEY_LEN]> {
    parse_key(text.trim())
}

/// Who this agent is on the mesh.
pub struct Identity {
    pub node: String,
    key: StaticKey,
    psk: Option<[u8; KEY_LEN]>,
}

impl Identity {
    /// `secret`, when given, must be the same on every agent: it is mixed
    /// into every handshake as a pre-shared key.
    pub fn new(node: String, key: StaticKey, secret: Option<&[u8]>) -> Identity {
        let psk = secret.map(|s| {
            let mut h = Sha256::new();
            h.update(b"edgewire mesh psk\0");
            h.update(s);
            h.finalize().into()
        });
        Identity { node, key, psk }
    }

    pub fn public_hex(&self) -> String {
        self.key.public_hex()
    }

    fn builder(&self) -> Result<Builder<'_>, snow::Error> {
        let pattern = if self.psk.is_some() {
            PATTERN_PSK
        } else {
            PATTERN
        };
        let mut builder = Builder::new(pattern.parse()?)
            .local_private_key(&self.key.private)?
            .prologue(PROLOGUE)?;
        if let Some(psk) = &self.psk {
            builder = builder.psk(3, psk)?;
        }
        Ok(builder)
    }
}

/// The dialer's side: `-> e`, `<- e, ee, s, es`, `-> s, se`. The peer's key
/// is checked before this side shows its own, and the last message names
/// this node.
pub async fn initiate<S, T>(
    mut sink: S,
    mut stream: T,
    me: &Identity,
    peer: &str,
    peer_key: &[u8; KEY_LEN],
    max_message: usize,
) -> Result<(SecureSink<S>, SecureStream<T>), HandshakeError>
where
    S: Sink<Message, Error = WsError> + Unpin,
    T: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut hs = me.builder()?.build_initiator()?;
    let mut out = vec![0u8; MAX_WIRE_MESSAGE];
    let mut payload = vec![0u8; MAX_WIRE_MESSAGE];
    let n = hs.write_message(&[], &mut out)?;
    send(&mut sink, &out[..n]).await?;
    let reply = receive(&mut stream).await?;
    hs.read_message(&reply, &mut payload)?;
    if hs.get_remote_static() != Some(&peer_key[..]) {
        return Err(HandshakeError::WrongPeer(peer.to_string()));
    }
    let n = hs.write_message(me.node.as_bytes(), &mut out)?;
    send(&mut sink, &out[..n]).await?;
    let cipher = Arc::new(hs.into_stateless_transport_mode()?);
    let (sink, mut stream) = secure(sink, stream, cipher, max_message);
    // The link is up only once the acceptor has taken us: its first
    // message, empty, proves it derived the same keys (so the same
    // pre-shared key too) and accepted this node.
    loop {
        match stream.next().await {
            Some(Ok(Message::Binary(confirm))) if confirm.is_empty() => return Ok((sink, stream)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None => return Err(HandshakeError::Closed),
            _ => return Err(HandshakeError::Unexpected),
        }
    }
}

/// The acceptor's side. `key_of` gives the key a node must show to link
/// here (None: not a peer); returns the dialer's node name.
pub async fn respond<S, T>(
    mut sink: S,
    mut stream: T,
    me: &Identity,
    key_of: impl Fn(&str) -> Option<[u8; KEY_LEN]>,
    max_message: usize,
) -> Result<(String, SecureSink<S>, SecureStream<T>), HandshakeError>
where
    S: Sink<Message, Error = WsError> + Unpin,
    T: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut hs = me.builder()?.build_responder()?;
    let mut out = vec![0u8; MAX_WIRE_MESSAGE];
    let mut payload = vec![0u8; MAX_WIRE_MESSAGE];
    let first = receive(&mut stream).await?;
    hs.read_message(&first, &mut payload)?;
    let n = hs.write_message(&[], &mut out)?;
    send(&mut sink, &out[..n]).await?;
    let last = receive(&mut stream).await?;
    let n = hs.read_message(&last, &mut payload)?;
    let node = std::str::from_utf8(&payload[..n])
        .map_err(|_| HandshakeError::Unexpected)?
        .to_string();
    let shown = hs.get_remote_static();
    if key_of(&node).is_none_or(|key| shown != Some(&key[..])) {
        return Err(HandshakeError::UnknownPeer(node));
    }
    let cipher = Arc::new(hs.into_stateless_transport_mode()?);
    let (mut sink, stream) = secure(sink, stream, cipher, max_message);
    sink.send(Message::Binary(Bytes::new()))
        .await
        .map_err(HandshakeError::Write)?;
    Ok((node, sink, stream))
}

async fn send<S>(sink: &mut S, message: &[u8]) -> Result<(), HandshakeError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    sink.send(Message::Binary(Bytes::copy_from_slice(message)))
        .await
        .map_err(HandshakeError::Write)
}

async fn receive<T>(stream: &mut T) -> Result<Bytes, HandshakeError>
where
    T: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(Message::Binary(bytes))) if bytes.len() <= MAX_WIRE_MESSAGE => {
                return Ok(bytes);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None => return Err(HandshakeError::Closed),
            Some(Ok(_)) | Some(Err(_)) => return Err(HandshakeError::Unexpected),
        }
    }
}

fn secure<S, T>(
    sink: S,
    stream: T,
    cipher: Arc<StatelessTransportState>,
    max_message: usize,
) -> (SecureSink<S>, SecureStream<T>) {
    (
        SecureSink {
            inner: sink,
            cipher: Arc::clone(&cipher),
            nonce: 0,
            sealed: VecDeque::new(),
        },
        SecureStream {
            inner: stream,
            cipher,
            nonce: 0,
            partial: BytesMut::new(),
            binary: None,
            max_message,
            plain: vec![0u8; MAX_WIRE_MESSAGE],
        },
    )
}

fn broken(why: &'static str) -> WsError {
    WsError::Io(io::Error::new(io::ErrorKind::InvalidData, why))
}

/// The writing half of a secured link: text and binary messages go out
/// encrypted (in chunks); pings, pongs and close frames as they are.
pub struct SecureSink<S> {
    inner: S,
    cipher: Arc<StatelessTransportState>,
    nonce: u64,
    /// Encrypted chunks not yet handed to the WebSocket.
    sealed: VecDeque<Message>,
}

impl<S> SecureSink<S>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    fn seal(&mut self, kind: u8, data: &[u8]) -> Result<(), WsError> {
        let count = data.len().div_ceil(CHUNK).max(1);
        for i in 0..count {
            let chunk = &data[(i * CHUNK).min(data.len())..((i + 1) * CHUNK).min(data.len())];
            let flags = kind | if i + 1 == count { FINAL } else { 0 };
            let mut plain = Vec::with_capacity(1 + chunk.len());
            plain.push(flags);
            plain.extend_from_slice(chunk);
            let mut out = vec![0u8; plain.len() + TAG_LEN];
            let n = self
                .cipher
                .write_message(self.nonce, &plain, &mut out)
                .map_err(|_| broken("cannot encrypt a mesh frame"))?;
            self.nonce += 1;
            out.truncate(n);
            self.sealed.push_back(Message::Binary(Bytes::from(out)));
        }
        Ok(())
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        while !self.sealed.is_empty() {
            ready!(Pin::new(&mut self.inner).poll_ready(cx))?;
            if let Some(message) = self.sealed.pop_front() {
                Pin::new(&mut self.inner).start_send(message)?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S> Sink<Message> for SecureSink<S>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().poll_drain(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        let this = self.get_mut();
        match item {
            Message::Text(text) => this.seal(0, text.as_bytes()),
            Message::Binary(bytes) => this.seal(BINARY, &bytes),
            control => {
                this.sealed.push_back(control);
                Ok(())
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

/// The reading half of a secured link: yields the peer's text and binary
/// messages once whole and authentic; anything forged, replayed, out of
/// order or in plaintext ends the link with an error.
pub struct SecureStream<T> {
    inner: T,
    cipher: Arc<StatelessTransportState>,
    nonce: u64,
    partial: BytesMut,
    /// The kind of the message being reassembled.
    binary: Option<bool>,
    max_message: usize,
    plain: Vec<u8>,
}

impl<T> SecureStream<T> {
    fn open(&mut self, sealed: &[u8]) -> Result<Option<Message>, WsError> {
        if sealed.len() <= TAG_LEN || sealed.len() > MAX_WIRE_MESSAGE {
            return Err(broken("a mesh frame of the wrong size"));
        }
        let n = self
            .cipher
            .read_message(self.nonce, sealed, &mut self.plain)
            .map_err(|_| broken("a mesh frame failed authentication"))?;
        self.nonce += 1;
        let Some((&flags, data)) = self.plain[..n].split_first() else {
            return Err(broken("an empty mesh frame"));
        };
        let binary = flags & BINARY != 0;
        if *self.binary.get_or_insert(binary) != binary {
            return Err(broken("a mesh frame changed kind midway"));
        }
        if self.partial.len() + data.len() > self.max_message {
            return Err(broken("a mesh message over the size limit"));
        }
        self.partial.extend_from_slice(data);
        if flags & FINAL == 0 {
            return Ok(None);
        }
        self.binary = None;
        let whole = self.partial.split().freeze();
        if binary {
            Ok(Some(Message::Binary(whole)))
        } else {
            Utf8Bytes::try_from(whole)
                .map(|text| Some(Message::Text(text)))
                .map_err(|_| broken("a mesh text frame is not UTF-8"))
        }
    }
}

impl<T> Stream for SecureStream<T>
where
    T: Stream<Item = Result<Message, WsError>> + Unpin,
{
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let message = match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                Some(Ok(message)) => message,
            };
            match message {
                Message::Binary(sealed) => match this.open(&sealed) {
                    Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                    Ok(None) => continue,
                    Err(err) => return Poll::Ready(Some(Err(err))),
                },
                Message::Text(_) | Message::Frame(_) => {
                    return Poll::Ready(Some(Err(broken("plaintext on an encrypted mesh link"))));
                }
                control => return Poll::Ready(Some(Ok(control))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream::{SplitSink, SplitStream};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;

    type Ws = WebSocketStream<DuplexStream>;
    type Tx = SecureSink<SplitSink<Ws, Message>>;
    type Rx = SecureStream<SplitStream<Ws>>;

    fn identity(node: &str, seed: u8, secret: Option<&[u8]>) -> Identity {
        Identity::new(
            node.into(),
            StaticKey::from_private([seed; KEY_LEN]),
            secret,
        )
    }

    /// Runs both sides of a handshake over an in-memory WebSocket.
    async fn link(
        dialer: &Identity,
        acceptor: &Identity,
        expected: [u8; KEY_LEN],
        known: Vec<(String, [u8; KEY_LEN])>,
    ) -> (
        Result<(Tx, Rx), HandshakeError>,
        Result<(String, Tx, Rx), HandshakeError>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let (ctx, crx) = client.split();
        let (stx, srx) = server.split();
        let key_of = move |node: &str| known.iter().find(|(n, _)| n == node).map(|(_, k)| *k);
        tokio::join!(
            // A refused dialer drops its halves: the acceptor sees the end.
            initiate(ctx, crx, dialer, "b", &expected, 1 << 20),
            respond(stx, srx, acceptor, key_of, 1 << 20),
        )
    }

    #[tokio::test]
    async fn linked_peers_exchange_whole_messages_of_any_size() {
        let a = identity("a", 1, None);
        let b = identity("b", 2, None);
        let (d, r) = link(&a, &b, *b.key.public(), vec![("a".into(), *a.key.public())]).await;
        let (mut tx, _rx) = d.unwrap();
        let (node, _tx2, mut rx) = r.unwrap();
        assert_eq!(node, "a");
        let big = "x".repeat(3 * CHUNK + 5);
        tx.send(Message::text(big.clone())).await.unwrap();
        tx.send(Message::Binary(Bytes::from_static(b"")))
            .await
            .unwrap();
        tx.send(Message::Binary(Bytes::from_static(b"\x01bin")))
            .await
            .unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap(), Message::text(big));
        assert_eq!(
            rx.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::new())
        );
        assert_eq!(
            rx.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"\x01bin"))
        );
    }

    #[tokio::test]
    async fn the_dialer_refuses_a_key_other_than_the_peers() {
        let a = identity("a", 1, None);
        let b = identity("b", 2, None);
        let (d, r) = link(&a, &b, [9; KEY_LEN], vec![("a".into(), *a.key.public())]).await;
        assert!(matches!(d, Err(HandshakeError::WrongPeer(_))));
        assert!(r.is_err(), "the acceptor never hears who the dialer is");
    }

    #[tokio::test]
    async fn the_acceptor_refuses_a_node_with_another_key_or_none() {
        let a = identity("a", 1, None);
        let b = identity("b", 2, None);
        let (_, r) = link(&a, &b, *b.key.public(), vec![("a".into(), [9; KEY_LEN])]).await;
        assert!(matches!(r, Err(HandshakeError::UnknownPeer(n)) if n == "a"));
        let (_, r) = link(&a, &b, *b.key.public(), vec![]).await;
        assert!(matches!(r, Err(HandshakeError::UnknownPeer(_))));
    }

    #[tokio::test]
    async fn a_different_pre_shared_key_fails_the_handshake() {
        let a = identity("a", 1, Some(b"one secret"));
        let b = identity("b", 2, Some(b"another secret"));
        let (d, r) = link(&a, &b, *b.key.public(), vec![("a".into(), *a.key.public())]).await;
        assert!(d.is_err() || r.is_err());
        assert!(r.is_err());
    }

    #[test]
    fn keys_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/mesh.key");
        let made = StaticKey::load_or_create(&path).unwrap();
        let read = StaticKey::load_or_create(&path).unwrap();
        assert_eq!(made.public(), read.public());
        assert_eq!(parse_public(&made.public_hex()), Some(*made.public()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            StaticKey::load_or_create(&path),
            Err(KeyError::Invalid(_))
        ));
        assert_eq!(parse_public("00"), None);
    }
}
