//! Publishers and subscribers on one channel, each connected to a node,
//! reconnecting when their node's agent goes away, recording what they sent
//! and heard on this machine's clock for `judge`.
#![allow(dead_code)]

pub mod judge;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use judge::{Heard, Published, PublisherLog, Session, SubscriberLog};

/// One publish per publisher this often.
const PERIOD: Duration = Duration::from_millis(100);
/// Bound on a connect, a subscribe's reply and a write.
const IO_DEADLINE: Duration = Duration::from_secs(5);
/// Pause between reconnect attempts while a node's agent is away.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// Every client stops by then, whatever the test does.
const LIFETIME: Duration = Duration::from_secs(900);

/// The clients running; `stop_publishing` then `finish` stop them.
pub struct Traffic {
    stop_publishers: watch::Sender<bool>,
    stop_subscribers: watch::Sender<bool>,
    publishers: Vec<JoinHandle<PublisherLog>>,
    subscribers: Vec<JoinHandle<SubscriberLog>>,
    /// What every subscriber heard so far: (subscriber, publisher) pairs.
    heard: watch::Receiver<Vec<(usize, usize)>>,
}

impl Traffic {
    /// A publisher and a subscriber on `channel` at each relay in `nodes`
    /// (`ws://ADDR/relay`); node `i` is index `i` in the logs.
    pub fn start(nodes: &[SocketAddr], channel: &str) -> Traffic {
        let (stop_publishers, publishers_stop) = watch::channel(false);
        let (stop_subscribers, subscribers_stop) = watch::channel(false);
        let (heard_tx, heard) = watch::channel(Vec::new());
        let deadline = Instant::now() + LIFETIME;
        let publishers = nodes
            .iter()
            .enumerate()
            .map(|(index, addr)| {
                tokio::spawn(publish(
                    index,
                    *addr,
                    channel.to_string(),
                    publishers_stop.clone(),
                    deadline,
                ))
            })
            .collect();
        let subscribers = nodes
            .iter()
            .enumerate()
            .map(|(index, addr)| {
                tokio::spawn(subscribe(
                    index,
                    *addr,
                    channel.to_string(),
                    subscribers_stop.clone(),
                    heard_tx.clone(),
                    deadline,
                ))
            })
            .collect();
        Traffic {
            stop_publishers,
            stop_subscribers,
            publishers,
            subscribers,
            heard,
        }
    }

    /// Waits until every subscriber has heard every publisher, at most
    /// `within`; false when some never did.
    pub async fn wait_all_heard(&mut self, within: Duration) -> bool {
        let n = self.publishers.len();
        let everyone = |pairs: &Vec<(usize, usize)>| pairs.len() == n * n;
        tokio::time::timeout(within, self.heard.wait_for(everyone))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// What has been heard so far, (subscriber, publisher) pairs.
    pub fn heard(&self) -> Vec<(usize, usize)> {
        self.heard.borrow().clone()
    }

    pub fn stop_publishing(&self) {
        let _ = self.stop_publishers.send(true);
    }

    /// Stops every client and returns their logs.
    pub async fn finish(self) -> (Vec<PublisherLog>, Vec<SubscriberLog>) {
        let _ = self.stop_publishers.send(true);
        let _ = self.stop_subscribers.send(true);
        let mut publishers = Vec::new();
        for task in self.publishers {
            publishers.push(task.await.expect("publisher task"));
        }
        let mut subscribers = Vec::new();
        for task in self.subscribers {
            subscribers.push(task.await.expect("subscriber task"));
        }
        (publishers, subscribers)
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr) -> Option<Ws> {
    let url = format!("ws://{addr}/relay");
    match tokio::time::timeout(IO_DEADLINE, tokio_tungstenite::connect_async(&url)).await {
        Ok(Ok((ws, _))) => Some(ws),
        _ => None,
    }
}

/// Returns once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps `pause` unless `stop` comes first; true when stopped.
async fn pause_or_stop(stop: &mut watch::Receiver<bool>, pause: Duration) -> bool {
    let early = tokio::select! {
        _ = stopped(stop) => true,
        _ = tokio::time::sleep(pause) => false,
    };
    early || *stop.borrow()
}

/// Records a session's end; closes the connection when the test ended it.
async fn end_session(sessions: &mut Vec<Session>, start: Instant, lost: bool, mut ws: Ws) {
    sessions.push(Session {
        start,
        end: Instant::now(),
        lost,
    });
    if !lost {
        let _ = tokio::time::timeout(IO_DEADLINE, ws.close(None)).await;
    }
}

async fn publish(
    index: usize,
    addr: SocketAddr,
    channel: String,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
) -> PublisherLog {
    let mut log = PublisherLog {
        node: index,
        sessions: Vec::new(),
        sent: Vec::new(),
    };
    let mut n = 0u64;
    while !*stop.borrow() && Instant::now() < deadline {
        let Some(mut ws) = connect(addr).await else {
            if pause_or_stop(&mut stop, RECONNECT_PAUSE).await {
                break;
            }
            continue;
        };
        let start = Instant::now();
        let mut tick = tokio::time::interval(PERIOD);
        let lost = loop {
            tokio::select! {
                _ = stopped(&mut stop) => break false,
                _ = tick.tick() => {
                    if Instant::now() >= deadline {
                        break false;
                    }
                    n += 1;
                    let at = Instant::now();
                    let text = json!({"type": "publish", "channel": channel, "data": {"p": index, "n": n}});
                    match tokio::time::timeout(IO_DEADLINE, ws.send(Message::text(text.to_string()))).await {
                        Ok(Ok(())) => log.sent.push(Published { n, at }),
                        _ => break true,
                    }
                }
                // Nothing is expected back but pings and, when the agent
                // goes away, its close.
                msg = ws.next() => match msg {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break true,
                    Some(Ok(_)) => {}
                },
            }
        };
        end_session(&mut log.sessions, start, lost, ws).await;
    }
    log
}

async fn subscribe(
    index: usize,
    addr: SocketAddr,
    channel: String,
    mut stop: watch::Receiver<bool>,
    heard_tx: watch::Sender<Vec<(usize, usize)>>,
    deadline: Instant,
) -> SubscriberLog {
    let mut log = SubscriberLog {
        node: index,
        sessions: Vec::new(),
        heard: Vec::new(),
    };
    while !*stop.borrow() && Instant::now() < deadline {
        let Some(mut ws) = connect(addr).await else {
            if pause_or_stop(&mut stop, RECONNECT_PAUSE).await {
                break;
            }
            continue;
        };
        let request = json!({"type": "subscribe", "channel": channel, "id": "sub"});
        let subscribed = tokio::time::timeout(IO_DEADLINE, async {
            ws.send(Message::text(request.to_string())).await.ok()?;
            loop {
                match ws.next().await? {
                    Ok(Message::Text(text)) => {
                        let reply: Value = serde_json::from_str(&text).ok()?;
                        return (reply["type"] == "subscribed").then_some(());
                    }
                    Ok(Message::Ping(_) | Message::Pong(_)) => {}
                    _ => return None,
                }
            }
        })
        .await;
        if !matches!(subscribed, Ok(Some(()))) {
            if pause_or_stop(&mut stop, RECONNECT_PAUSE).await {
                break;
            }
            continue;
        }
        let session = log.sessions.len();
        let start = Instant::now();
        let lost = loop {
            tokio::select! {
                _ = stopped(&mut stop) => break false,
                _ = tokio::time::sleep_until(deadline.into()) => break false,
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(message) = serde_json::from_str::<Value>(&text) else { continue };
                        if message["type"] != "message" || message["channel"] != channel.as_str() {
                            continue;
                        }
                        let (Some(publisher), Some(n)) =
                            (message["data"]["p"].as_u64(), message["data"]["n"].as_u64())
                        else {
                            continue;
                        };
                        let publisher = usize::try_from(publisher).unwrap_or(usize::MAX);
                        log.heard.push(Heard { publisher, n, session });
                        heard_tx.send_if_modified(|pairs| {
                            let pair = (index, publisher);
                            let new = !pairs.contains(&pair);
                            if new {
                                pairs.push(pair);
                            }
                            new
                        });
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break true,
                    Some(Ok(_)) => {}
                },
            }
        };
        end_session(&mut log.sessions, start, lost, ws).await;
    }
    log
}
