//! One WebSocket session: reads the client's frames, answers them (echo or the
//! relay protocol), writes channel deliveries from the send queue, pings, and
//! closes with the code RFC 6455 names for what went wrong.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgewire_api::wire::{self, ClientMessage, ErrorCode, ServerMessage, WireError};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes, error::ProtocolError};

use super::batch::{self, Packer};
use super::publish;
use super::socket::ClientSocket;
use super::wasm_relay::{self, Prepared};
use super::{ConnectionSlot, ServiceRuntime, gate};
use crate::auth::{Access, Action};
use crate::handlers;
use crate::mesh::Backlog;
use crate::metrics::{DeliveryPath, DropReason};
use crate::relay::{ConnId, Delivery, Frames, Subscriber};

type Ws = WebSocketStream<ClientSocket>;
type Sink = SplitSink<Ws, Message>;

/// How long the agent waits for the client's half of a close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Deliveries written per flush, so one busy subscriber cannot hog its task
/// (in batch mode `batch::MAX_MESSAGES`, as they leave in few frames).
const MAX_BATCH: usize = 64;
/// Frames handled in one go when the client has sent several (see
/// `Session::read_run`): bounded, so deliveries, pings and shutdown still
/// get their turn under a flood.
const READ_RUN: usize = 64;
/// How long a stopping service's sessions may take to write out what is
/// already queued for their clients.
const FLUSH_ON_STOP: Duration = Duration::from_secs(2);
/// The longest close reason RFC 6455 allows (125 bytes of payload less the code).
const MAX_CLOSE_REASON: usize = 123;

/// What a text frame means on this connection.
pub enum Mode {
    /// A WebSocket echo handler: `Echo: <text>` for each text message.
    Echo { handler: String },
    /// The JSON envelope protocol: channels and handler calls; `batch` when
    /// the client asked for batch mode (`batch::SUBPROTOCOL`).
    Relay { batch: bool },
}

/// Why the session ends: with a close frame of ours, because the peer went,
/// or because the peer stopped taking bytes (nothing more can be written).
enum End {
    Close(CloseCode, String),
    PeerGone,
    Stuck,
}

impl End {
    fn close(code: CloseCode, reason: impl Into<String>) -> End {
        End::Close(code, reason.into())
    }
}

struct Session {
    runtime: Arc<ServiceRuntime>,
    id: ConnId,
    mode: Mode,
    /// What the client's token allows, and until when.
    access: Access,
    subscriptions: BTreeSet<String>,
    /// Created on the first subscribe: an echo client or a pure publisher
    /// never pays for a queue.
    queue: Option<(Subscriber, mpsc::Receiver<Delivery>, mpsc::Receiver<()>)>,
    /// Mesh links the last publish left over their pacing threshold: the
    /// client is not read again until they drain.
    backlog: Backlog,
    /// Writing out the queue as the service stops (`flush_on_stop`).
    flushing: bool,
    /// Publishes read together and not yet queued for the local
    /// subscribers; kept (emptied) once the client has published, so a
    /// publisher allocates it once.
    run: Option<Box<LocalRun>>,
}

/// Publishes one client sent back to back on one channel, read in one go:
/// queued for the local subscribers together (`Hub::publish_run`), at the
/// end of the run of frames or before anything else the client asked.
struct LocalRun {
    channel: String,
    frames: Vec<Utf8Bytes>,
    /// When the first of them was read.
    published_at: Instant,
}

pub async fn run(
    runtime: Arc<ServiceRuntime>,
    ws: Ws,
    mode: Mode,
    access: Access,
    _slot: ConnectionSlot,
) {
    let id = runtime.next_conn_id();
    let (mut sink, mut stream) = ws.split();
    let mut session = Session {
        runtime: Arc::clone(&runtime),
        id,
        mode,
        access,
        subscriptions: BTreeSet::new(),
        queue: None,
        backlog: Backlog::default(),
        flushing: false,
        run: None,
    };
    let end = session.serve(&mut sink, &mut stream).await;
    for channel in runtime.hub.remove_connection(&session.subscriptions, id) {
        runtime.interest_changed(&channel);
    }
    if let Some((subscriber, _, _)) = &session.queue {
        // A link waiting for this subscriber need not wait for it any more.
        subscriber.pacer.release();
    }
    drop(session);

    match end {
        End::Close(code, reason) => {
            let mut reason = reason;
            truncate_utf8(&mut reason, MAX_CLOSE_REASON);
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            };
            // Bounded: a client that takes no bytes must not hold the session.
            let sent =
                tokio::time::timeout(CLOSE_WAIT, sink.send(Message::Close(Some(frame)))).await;
            if let Ok(Ok(())) = sent {
                // Read until the client's close (or the wait runs out), so the
                // client sees a clean close handshake rather than a reset.
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    while let Some(Ok(_)) = stream.next().await {}
                })
                .await;
            }
        }
        End::Stuck => {}
        // tungstenite queued the reply to a client's close; push it out.
        End::PeerGone => {
            let _ = tokio::time::timeout(CLOSE_WAIT, sink.flush()).await;
        }
    }
}

impl Session {
    async fn serve(&mut self, sink: &mut Sink, stream: &mut SplitStream<Ws>) -> End {
        let runtime = Arc::clone(&self.runtime);
        let limits = &runtime.config.limits;
        let ping_every = Duration::from_secs(limits.ping_interval_seconds.into());
        let idle = Duration::from_secs(limits.idle_timeout_seconds.into());
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline = tokio::time::Instant::now() + idle;
        let expiry = gate::expiry(&self.access);
        tokio::pin!(expiry);

        loop {
            let (deliveries, evictions) = match &mut self.queue {
                Some((_, rx, evict)) => (Some(rx), Some(evict)),
                None => (None, None),
            };
            tokio::select! {
                _ = runtime.stop.cancelled() => {
                    // Boxed: inline, every idle session would carry room
                    // for writing out its queue (about 0.8 KB).
                    Box::pin(self.flush_on_stop(sink)).await;
                    let (code, reason) = runtime.stop_reason();
                    return End::close(code, reason);
                }
                () = &mut expiry => {
                    let (code, reason) = gate::expired(&runtime);
                    return End::close(code, reason);
                }
                Some(()) = recv_or_pending(evictions) => return slow_consumer(),
                Some(first) = recv_or_pending(deliveries) => {
                    // Boxed, like `read_run`: idle sessions keep only what waiting needs.
                    if let Err(end) = Box::pin(self.write_deliveries(sink, first)).await {
                        return end;
                    }
                }
                _ = ping.tick() => {
                    if let Err(end) = self.guarded(sink.send(Message::Ping(Default::default()))).await {
                        return end;
                    }
                }
                read = tokio::time::timeout_at(deadline, stream.next()) => {
                    let frame = match read {
                        Err(_) => return End::close(CloseCode::Normal, "idle timeout"),
                        Ok(None) => return End::PeerGone,
                        Ok(Some(Err(err))) => return self.read_error(err),
                        Ok(Some(Ok(frame))) => frame,
                    };
                    deadline = tokio::time::Instant::now() + idle;
                    // Boxed: every idle session would otherwise carry room
                    // for the state of handling a frame.
                    if let Err(end) = Box::pin(self.read_run(sink, stream, frame)).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Handles `first` and then the frames already read behind it (up to
    /// [`READ_RUN`]), so a busy client costs one wait in the session's loop
    /// per run of frames rather than per frame.
    async fn read_run(
        &mut self,
        sink: &mut Sink,
        stream: &mut SplitStream<Ws>,
        first: Message,
    ) -> Result<(), End> {
        let read = self.read_frames(sink, stream, first).await;
        // Whatever was published in the run reaches its subscribers, even
        // if a later frame in it ends the session.
        self.deliver_run();
        read
    }

    async fn read_frames(
        &mut self,
        sink: &mut Sink,
        stream: &mut SplitStream<Ws>,
        first: Message,
    ) -> Result<(), End> {
        let runtime = Arc::clone(&self.runtime);
        let mut frame = first;
        let mut taken = 0;
        loop {
            taken += 1;
            match frame {
                Message::Text(text) => {
                    runtime.counters.messages_in.inc();
                    self.on_text(sink, text).await?;
                    if !self.backlog.is_empty() {
                        // Local subscribers get the run before the client
                        // waits for the mesh.
                        self.deliver_run();
                        let backlog = std::mem::take(&mut self.backlog);
                        self.pace(sink, backlog).await?;
                    }
                }
                Message::Binary(_) => {
                    runtime.counters.messages_in.inc();
                    runtime
                        .metrics
                        .dropped(runtime.name(), DropReason::Unsupported);
                    return Err(End::close(
                        CloseCode::Unsupported,
                        "binary messages are not supported; send text",
                    ));
                }
                Message::Close(_) => return Err(End::PeerGone),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
            if taken == READ_RUN {
                return Ok(());
            }
            frame = match stream.next().now_or_never() {
                Some(Some(Ok(next))) => next,
                Some(Some(Err(err))) => return Err(self.read_error(err)),
                Some(None) => return Err(End::PeerGone),
                // Nothing more read yet: back to waiting for anything.
                None => return Ok(()),
            };
        }
    }

    /// Backpressure: reads nothing more from this client until the mesh
    /// links its publish filled have drained (or gone down, or stuck), so
    /// TCP holds back a publisher that outruns the mesh. Deliveries to this
    /// client still flow meanwhile; eviction and shutdown still apply.
    async fn pace(&mut self, sink: &mut Sink, backlog: Backlog) -> Result<(), End> {
        let runtime = Arc::clone(&self.runtime);
        let drained = backlog.drained();
        tokio::pin!(drained);
        loop {
            let (deliveries, evictions) = match &mut self.queue {
                Some((_, rx, evict)) => (Some(rx), Some(evict)),
                None => (None, None),
            };
            tokio::select! {
                () = &mut drained => return Ok(()),
                _ = runtime.stop.cancelled() => {
                    self.flush_on_stop(sink).await;
                    let (code, reason) = runtime.stop_reason();
                    return Err(End::close(code, reason));
                }
                Some(()) = recv_or_pending(evictions) => return Err(slow_consumer()),
                Some(first) = recv_or_pending(deliveries) => self.write_deliveries(sink, first).await?,
            }
        }
    }

    /// Maps a read error to the close code RFC 6455 gives it, counting the drop.
    fn read_error(&self, err: WsError) -> End {
        let runtime = &self.runtime;
        let (reason, end) = match err {
            WsError::Capacity(cap) => (
                DropReason::Oversize,
                End::close(CloseCode::Size, cap.to_string()),
            ),
            WsError::Utf8(_) => (
                DropReason::InvalidUtf8,
                End::close(CloseCode::Invalid, "text message is not valid UTF-8"),
            ),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                return End::PeerGone;
            }
            WsError::Protocol(p) => (
                DropReason::Protocol,
                End::close(CloseCode::Protocol, p.to_string()),
            ),
            _ => return End::PeerGone,
        };
        runtime.metrics.dropped(runtime.name(), reason);
        end
    }

    /// Runs one write, giving up when the session is evicted as a slow
    /// consumer or when the client takes no bytes for the idle timeout: a
    /// blocked socket must never wedge the session. When the service stops
    /// meanwhile, the write gets `FLUSH_ON_STOP` more to finish.
    async fn guarded<F>(&mut self, write: F) -> Result<(), End>
    where
        F: std::future::Future<Output = Result<(), WsError>>,
    {
        let runtime = Arc::clone(&self.runtime);
        let idle = Duration::from_secs(runtime.config.limits.idle_timeout_seconds.into());
        // Stopping (`flush_on_stop`), the last writes have their own short
        // bound, and neither the stop nor an eviction cuts them short.
        let flushing = self.flushing;
        let bound = if flushing {
            FLUSH_ON_STOP.min(idle)
        } else {
            idle
        };
        let evictions = if flushing {
            None
        } else {
            self.queue.as_mut().map(|(_, _, evict)| evict)
        };
        let write = tokio::time::timeout(bound, write);
        tokio::pin!(write);
        tokio::select! {
            written = &mut write => write_outcome(written),
            _ = runtime.stop.cancelled(), if !flushing => {
                // A write under way is finished (within `FLUSH_ON_STOP`):
                // the frames it carries have left the queue, and the session
                // then writes out the rest before it closes.
                self.flushing = true;
                match tokio::time::timeout(FLUSH_ON_STOP, &mut write).await {
                    Ok(written) => write_outcome(written),
                    Err(_) => Err(End::Stuck),
                }
            }
            Some(()) = recv_or_pending(evictions) => Err(slow_consumer()),
        }
    }

    async fn send_text(&mut self, sink: &mut Sink, text: String) -> Result<(), End> {
        let frame = if self.batch() {
            batch::single(&text)
        } else {
            Utf8Bytes::from(text)
        };
        self.guarded(sink.send(Message::Text(frame))).await?;
        self.runtime.counters.messages_out.inc();
        Ok(())
    }

    async fn reply(&mut self, sink: &mut Sink, message: ServerMessage) -> Result<(), End> {
        self.send_text(sink, message.to_json()).await
    }

    async fn on_text(&mut self, sink: &mut Sink, text: Utf8Bytes) -> Result<(), End> {
        match &self.mode {
            Mode::Echo { handler } => {
                let started = Instant::now();
                let reply = handlers::echo(text.as_str());
                self.runtime
                    .metrics
                    .handler_duration
                    .with_label_values(&[self.runtime.name(), handler])
                    .observe(started.elapsed().as_secs_f64());
                self.send_text(sink, reply).await
            }
            Mode::Relay { .. } => {
                let answer = match publish::parse(text.as_str()) {
                    Some(plain) if self.publishes_as_is(&plain.channel) => {
                        self.on_plain_publish(plain)
                    }
                    _ => {
                        // Anything else the client asks comes after what it
                        // published before.
                        self.deliver_run();
                        match wire::parse_client_message(text.as_str()) {
                            Ok(request) => self.on_relay_request(request).await,
                            Err(err) => Err(err),
                        }
                    }
                };
                match answer {
                    Ok(Some(reply)) => self.reply(sink, reply).await,
                    Ok(None) => Ok(()),
                    Err(err) => self.refuse(sink, err).await,
                }
            }
        }
    }

    /// Whether a publish on `channel` is delivered as the client sent it:
    /// no processor transforms it and no uplink stores it (those take the
    /// full request).
    fn publishes_as_is(&self, channel: &str) -> bool {
        let config = &self.runtime.config;
        let uplinked = self.runtime.uplink.is_some() && config.is_uplink(channel);
        config.processor(channel).is_none() && !uplinked
    }

    /// A plain publish (see `publish`): the same checks and deliveries as
    /// a publish through `on_request`, without a JSON tree.
    fn on_plain_publish(
        &mut self,
        plain: publish::PlainPublish<'_>,
    ) -> Result<Option<ServerMessage>, WireError> {
        let id = plain.id.clone();
        self.known_channel(&id, &plain.channel)?;
        gate::permit(
            &self.runtime,
            &self.access,
            &id,
            Action::Publish,
            &plain.channel,
        )?;
        let published_at = Instant::now();
        let channel = plain.channel.clone().into_owned();
        // A publish the client wants acknowledged is queued before the
        // acknowledgement; any other may wait for the end of the run.
        let defer = id.is_none();
        self.fan_out(
            &channel,
            Utf8Bytes::from(plain.message_frame()),
            published_at,
            defer,
        );
        Ok(id.map(|id| ServerMessage::Published {
            id: Some(id),
            channel,
        }))
    }

    /// Forwards a publish's frame to the mesh and delivers it to the local
    /// subscribers: at once, or with `defer` at the end of the run of
    /// publishes it belongs to (see [`LocalRun`]).
    fn fan_out(&mut self, channel: &str, frame: Utf8Bytes, published_at: Instant, defer: bool) {
        let runtime = Arc::clone(&self.runtime);
        if let Some(mesh) = &runtime.mesh {
            self.backlog = mesh.forward(runtime.name(), channel, &frame);
        }
        // What waits goes first: a publish on another channel, or one that
        // is not deferred, comes after it.
        if !defer || self.run.as_ref().is_some_and(|run| run.channel != channel) {
            self.deliver_run();
        }
        if !defer {
            // Local subscribers never hold a publisher back (their
            // slow-consumer policy applies), so nothing to wait for here.
            let _ = runtime.deliver(channel, &frame, published_at, DeliveryPath::Local);
            return;
        }
        let run = self.run.get_or_insert_with(|| {
            Box::new(LocalRun {
                channel: String::new(),
                frames: Vec::new(),
                published_at,
            })
        });
        if run.frames.is_empty() {
            run.channel.clear();
            run.channel.push_str(channel);
            run.published_at = published_at;
        }
        run.frames.push(frame);
    }

    /// Queues the publishes waiting in the run for the local subscribers.
    fn deliver_run(&mut self) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        // Local subscribers never hold a publisher back (their slow-consumer
        // policy applies), so nothing to wait for here.
        let local = DeliveryPath::Local;
        let _ = self
            .runtime
            .deliver_all(&run.channel, &mut run.frames, run.published_at, local);
    }

    async fn refuse(&mut self, sink: &mut Sink, err: WireError) -> Result<(), End> {
        self.runtime
            .metrics
            .dropped(self.runtime.name(), err.code.into());
        self.reply(sink, err.to_server_message()).await
    }

    fn known_channel(&self, id: &Option<wire::RequestId>, channel: &str) -> Result<(), WireError> {
        if self.runtime.config.has_channel(channel) {
            Ok(())
        } else {
            Err(WireError::new(
                id.clone(),
                ErrorCode::UnknownChannel,
                format!(
                    "unknown channel {channel:?} on service {:?}",
                    self.runtime.name()
                ),
            ))
        }
    }

    /// A request that reaches a wasm handler (a call of one, a publish on a
    /// processed channel) awaits it first; the rest goes to `on_request`.
    async fn on_relay_request(
        &mut self,
        request: ClientMessage,
    ) -> Result<Option<ServerMessage>, WireError> {
        let runtime = Arc::clone(&self.runtime);
        // Held until the publish is delivered and answered: see
        // `ServiceRuntime::close_forwarding`.
        let mut _forwarding = None;
        // The token's grants are checked before any code runs: a call or a
        // processed publish the client may not make never reaches a handler.
        match &request {
            ClientMessage::Call { id, handler, .. } => gate::permit(
                &self.runtime,
                &self.access,
                &Some(id.clone()),
                Action::Call,
                handler,
            )?,
            ClientMessage::Publish {
                id,
                channel,
                origin,
                ..
            } => {
                self.known_channel(id, channel)?;
                gate::permit(&self.runtime, &self.access, id, Action::Publish, channel)?;
                if let Some(origin) = origin {
                    gate::permit(
                        &self.runtime,
                        &self.access,
                        id,
                        Action::Forward,
                        &origin.node,
                    )?;
                    let open = runtime.forwarding.read().await;
                    if !*open {
                        // Stopping: unanswered, the edge sends it again.
                        return Ok(None);
                    }
                    _forwarding = Some(open);
                }
                // A message an edge forwards again (its acknowledgement was
                // lost) is acknowledged, and not delivered a second time.
                if let Some(origin) = origin
                    && !self.runtime.dedup.accept(&origin.node, channel, origin.seq)
                {
                    self.runtime
                        .metrics
                        .uplink
                        .duplicates
                        .with_label_values(&[self.runtime.name()])
                        .inc();
                    return Ok(id.clone().map(|id| ServerMessage::Published {
                        id: Some(id),
                        channel: channel.clone(),
                    }));
                }
            }
            ClientMessage::Subscribe { .. } | ClientMessage::Unsubscribe { .. } => {}
        }
        match wasm_relay::prepare(&self.runtime, request).await {
            Prepared::Request(request) => self.on_request(request),
            Prepared::Reply(reply) => Ok(Some(reply)),
            Prepared::Publish {
                id,
                channel,
                messages,
            } => {
                for data in messages {
                    let publish = ClientMessage::Publish {
                        id: None,
                        channel: channel.clone(),
                        data,
                        origin: None,
                    };
                    self.on_request(publish)?;
                }
                Ok(id.map(|id| ServerMessage::Published {
                    id: Some(id),
                    channel,
                }))
            }
        }
    }

    /// Acts on one relay request; the reply, if the request gets one.
    fn on_request(&mut self, request: ClientMessage) -> Result<Option<ServerMessage>, WireError> {
        let runtime = Arc::clone(&self.runtime);
        match request {
            ClientMessage::Subscribe { id, channel } => {
                self.known_channel(&id, &channel)?;
                gate::permit(&runtime, &self.access, &id, Action::Subscribe, &channel)?;
                let subscriber = self.subscriber();
                if runtime.hub.subscribe(&channel, self.id, subscriber).edge {
                    runtime.interest_changed(&channel);
                }
                self.subscriptions.insert(channel.clone());
                Ok(Some(ServerMessage::Subscribed { id, channel }))
            }
            ClientMessage::Unsubscribe { id, channel } => {
                self.known_channel(&id, &channel)?;
                if runtime.hub.unsubscribe(&channel, self.id).edge {
                    runtime.interest_changed(&channel);
                }
                self.subscriptions.remove(&channel);
                Ok(Some(ServerMessage::Unsubscribed { id, channel }))
            }
            ClientMessage::Publish {
                id,
                channel,
                data,
                origin,
            } => {
                self.known_channel(&id, &channel)?;
                gate::permit(&runtime, &self.access, &id, Action::Publish, &channel)?;
                let published_at = Instant::now();
                // Stored for the hub before the publisher's reply, so a
                // publish the client saw acknowledged survives a crash.
                if let Some(uplink) = &runtime.uplink
                    && runtime.config.is_uplink(&channel)
                {
                    uplink.publish(&channel, &data);
                }
                let frame = Utf8Bytes::from(
                    ServerMessage::Message {
                        channel: channel.clone(),
                        data,
                        origin,
                    }
                    .to_json(),
                );
                self.fan_out(&channel, frame, published_at, false);
                Ok(id.map(|id| ServerMessage::Published {
                    id: Some(id),
                    channel,
                }))
            }
            ClientMessage::Call { id, handler, args } => {
                let Some(spec) = runtime.config.handler(&handler) else {
                    return Err(WireError::new(
                        Some(id),
                        ErrorCode::UnknownHandler,
                        format!(
                            "unknown handler {handler:?} on service {:?}",
                            runtime.name()
                        ),
                    ));
                };
                gate::permit(
                    &runtime,
                    &self.access,
                    &Some(id.clone()),
                    Action::Call,
                    &handler,
                )?;
                let started = Instant::now();
                let result = handlers::call(spec.kind, &args);
                runtime
                    .metrics
                    .handler_duration
                    .with_label_values(&[runtime.name(), &spec.name])
                    .observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(result) => Ok(Some(ServerMessage::Result {
                        id,
                        handler,
                        result,
                    })),
                    Err(handlers::HandlerError::InvalidArguments(why)) => {
                        Err(WireError::new(Some(id), ErrorCode::InvalidArguments, why))
                    }
                    Err(err @ handlers::HandlerError::NotBuiltin(_)) => Err(WireError::new(
                        Some(id),
                        ErrorCode::HandlerFailed,
                        err.to_string(),
                    )),
                }
            }
        }
    }

    fn subscriber(&mut self) -> Subscriber {
        let limits = &self.runtime.config.limits;
        let capacity = limits.send_queue_messages as usize;
        let bytes = limits.send_queue_bytes();
        let (subscriber, _, _) = self
            .queue
            .get_or_insert_with(|| Subscriber::new(capacity, bytes));
        subscriber.clone()
    }

    /// Whether this client asked for batch mode.
    fn batch(&self) -> bool {
        matches!(self.mode, Mode::Relay { batch: true })
    }

    /// The service is stopping: writes what is already queued for this
    /// client (within `FLUSH_ON_STOP`), so a message acknowledged to its
    /// publisher before the stop (an edge's above all, which is not sent
    /// again) still reaches it.
    async fn flush_on_stop(&mut self, sink: &mut Sink) {
        self.flushing = true;
        let until = Instant::now() + FLUSH_ON_STOP;
        while Instant::now() < until
            && let Some(first) = self.next_queued()
        {
            if self.write_deliveries(sink, first).await.is_err() {
                return;
            }
        }
    }

    fn next_queued(&mut self) -> Option<Delivery> {
        self.queue
            .as_mut()
            .and_then(|(_, rx, _)| rx.try_recv().ok())
    }

    /// Writes `first` and whatever else is already queued, then flushes once.
    /// In batch mode the messages are packed into as few frames as
    /// `batch` allows; otherwise each is a frame of its own.
    async fn write_deliveries(&mut self, sink: &mut Sink, first: Delivery) -> Result<(), End> {
        let runtime = Arc::clone(&self.runtime);
        let batch = self.batch();
        let limit = if batch {
            batch::MAX_MESSAGES
        } else {
            MAX_BATCH
        };
        let mut stamps = Vec::with_capacity(8);
        let mut taken = Vec::with_capacity(8);
        let mut count = 0;
        let mut next = Some(first);
        while let Some(delivery) = next.take() {
            let messages = delivery.frames.as_slice().len();
            stamps.push((delivery.published_at, delivery.path, messages));
            count += messages;
            taken.push(delivery.frames);
            if count < limit {
                next = self.next_queued();
            }
        }
        // The deliveries' bytes are back in their budgets from here.
        let frames = if batch {
            let mut frames = Vec::with_capacity(1);
            let mut packer = Packer::default();
            for message in taken.iter().flat_map(Frames::as_slice) {
                if !packer.fits(message.len()) {
                    frames.push(Message::Text(std::mem::take(&mut packer).finish()));
                }
                packer.push(message.as_str());
            }
            frames.push(Message::Text(packer.finish()));
            frames
        } else {
            let mut frames = Vec::with_capacity(count);
            for delivery in taken {
                match delivery {
                    Frames::One(frame) => frames.push(Message::Text(frame)),
                    Frames::Run(run) => frames.extend(run.iter().cloned().map(Message::Text)),
                }
            }
            frames
        };
        // One deadline for the run of frames and its flush, not a timer
        // per frame.
        self.guarded(async {
            for frame in frames {
                sink.feed(frame).await?;
            }
            sink.flush().await
        })
        .await?;
        if let Some((subscriber, _, _)) = &self.queue {
            subscriber.pacer.took(subscriber.caught_up());
        }
        let now = Instant::now();
        let counters = &runtime.counters;
        counters.messages_out.inc_by(count as u64);
        for (stamp, path, messages) in stamps {
            let seconds = now.duration_since(stamp).as_secs_f64();
            for _ in 0..messages {
                match counters.latency(path) {
                    Some(latency) => latency.observe(seconds),
                    None => runtime.metrics.latency(runtime.name(), path, seconds),
                }
            }
        }
        Ok(())
    }
}

/// A bounded write's outcome as the session sees it.
fn write_outcome(
    written: Result<Result<(), WsError>, tokio::time::error::Elapsed>,
) -> Result<(), End> {
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::PeerGone),
        Err(_) => Err(End::Stuck),
    }
}

fn slow_consumer() -> End {
    End::close(CloseCode::Policy, "slow consumer: send queue full")
}

async fn recv_or_pending<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}
