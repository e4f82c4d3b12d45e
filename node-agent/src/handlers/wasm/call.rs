//! One call of a component: a fresh instance in a fresh store, the request
//! handed to `wasi:http/incoming-handler`, the response read back within the
//! body cap and the wall-clock deadline. What went wrong is sorted into the
//! few outcomes a client is told (and the metrics count).

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::HeaderMap;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::limits::MemoryCap;
use super::module::Loaded;
use super::outbound::Outbound;

/// The store's data for one call.
pub struct CallState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: Outbound,
    memory: MemoryCap,
    deadline: Instant,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// What a call may use.
pub struct Budget {
    pub timeout: Duration,
    pub max_memory_bytes: u64,
    pub max_response_bytes: usize,
}

/// A component's complete response.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a call has no answer from the component. Each maps to an HTTP status
/// and to the `reason` label of `edgewire_handler_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No usable module (invalid, missing, still loading).
    #[error("handler unavailable: {0}")]
    Unavailable(String),
    #[error("handler busy: all {0} instances are in use")]
    Busy(u32),
    #[error("request body larger than {0} bytes")]
    RequestTooLarge(usize),
    #[error("the component trapped: {0}")]
    Trap(String),
    #[error("the component ran out of memory (cap {0} bytes)")]
    MemoryCap(u64),
    #[error("the component did not answer within {0:?}")]
    Timeout(Duration),
    #[error("response body larger than {0} bytes")]
    ResponseTooLarge(usize),
    #[error("the component gave no response: {0}")]
    NoResponse(String),
}

impl CallError {
    pub const REASONS: [&'static str; 8] = [
        "unavailable",
        "busy",
        "request_too_large",
        "trap",
        "memory",
        "timeout",
        "response_too_large",
        "no_response",
    ];

    pub fn status(&self) -> u16 {
        match self {
            CallError::Unavailable(_) | CallError::Busy(_) => 503,
            CallError::RequestTooLarge(_) => 413,
            CallError::Trap(_) | CallError::MemoryCap(_) | CallError::NoResponse(_) => 500,
            CallError::Timeout(_) => 504,
            CallError::ResponseTooLarge(_) => 502,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            CallError::Unavailable(_) => "unavailable",
            CallError::Busy(_) => "busy",
            CallError::RequestTooLarge(_) => "request_too_large",
            CallError::Trap(_) => "trap",
            CallError::MemoryCap(_) => "memory",
            CallError::Timeout(_) => "timeout",
            CallError::ResponseTooLarge(_) => "response_too_large",
            CallError::NoResponse(_) => "no_response",
        }
    }
}

/// Runs `request` through a fresh instance of `loaded`, stopped at
/// `deadline` (the call's, from its arrival: `budget.timeout` is what the
/// caller is told it was).
pub async fn run(
    loaded: &Arc<Loaded>,
    budget: &Budget,
    deadline: Instant,
    hooks: Outbound,
    request: hyper::Request<Full<Bytes>>,
) -> Result<Answer, CallError> {
    // Nothing of the host: no preopened directory (so no filesystem), no
    // environment or arguments, stdio to nowhere, sockets and name lookups
    // refused. Outbound HTTP goes through `hooks` alone.
    let wasi = WasiCtx::builder()
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build();
    let state = CallState {
        wasi,
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        hooks,
        memory: MemoryCap::new(budget.max_memory_bytes),
        deadline,
    };
    let mut store = Store::new(loaded.pre.engine(), state);
    store.limiter(|state| &mut state.memory);
    // At every epoch tick: past the deadline the guest is stopped where it
    // is; before it, it yields so other calls and connections get the CPU.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|ctx| {
        Ok(if Instant::now() >= ctx.data().deadline {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Yield(1)
        })
    });
    let internal = |err: wasmtime::Error| CallError::NoResponse(format!("{err:#}"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let req = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, request)
        .map_err(internal)?;
    let out = store
        .data_mut()
        .http()
        .new_response_outparam(tx)
        .map_err(internal)?;
    let pre = loaded.pre.clone();
    // The guest goes on running after it hands over the response head (it
    // writes the body then), so it is polled beside the reader of its
    // response, in this task: no task of its own to spawn, and no wake-up
    // of another worker for each part it hands over. Leaving this function
    // (at the deadline) drops it, which stops it at its next yield.
    let guest = async move {
        let result = async {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
        }
        .await;
        (result, store.data().memory.hit)
    };
    let mut guest = pin!(guest);
    let mut ended = None;

    let max_response = budget.max_response_bytes;
    let max_memory = budget.max_memory_bytes;
    let timeout = budget.timeout;
    let within = async {
        let finished = |(result, memory_hit): (wasmtime::Result<()>, bool)| match result {
            Ok(()) => None,
            Err(err) => Some(classify(err, memory_hit, max_memory, timeout)),
        };
        match beside(guest.as_mut(), &mut ended, rx).await {
            Ok(Ok(response)) => {
                let (parts, body) = response.into_parts();
                let body = body.map_err(|code| format!("the body failed: {code:?}"));
                let collected = beside(
                    guest.as_mut(),
                    &mut ended,
                    Limited::new(body, max_response).collect(),
                )
                .await;
                let body = match collected {
                    Ok(body) => body.to_bytes(),
                    Err(err) if err.is::<LengthLimitError>() => {
                        return Err(CallError::ResponseTooLarge(max_response));
                    }
                    Err(err) => {
                        return Err(finished(to_end(guest.as_mut(), &mut ended).await)
                            .unwrap_or_else(|| CallError::NoResponse(err.to_string())));
                    }
                };
                if let Some(err) = finished(to_end(guest.as_mut(), &mut ended).await) {
                    return Err(err);
                }
                Ok(Answer {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body,
                })
            }
            Ok(Err(code)) => Err(CallError::NoResponse(format!(
                "the component answered with error {code:?}"
            ))),
            Err(_) => Err(
                finished(to_end(guest.as_mut(), &mut ended).await).unwrap_or_else(|| {
                    CallError::NoResponse("the component returned without a response".into())
                }),
            ),
        }
    };
    match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), within).await {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout(budget.timeout)),
    }
}

/// Runs `work` to its end while also polling `guest`, until the guest ends
/// (its output is then kept in `ended`, and it is not polled again).
async fn beside<G: Future, W: Future>(
    mut guest: Pin<&mut G>,
    ended: &mut Option<G::Output>,
    work: W,
) -> W::Output {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if ended.is_none()
            && let Poll::Ready(output) = guest.as_mut().poll(cx)
        {
            *ended = Some(output);
        }
        work.as_mut().poll(cx)
    })
    .await
}

/// The guest's output, running it to its end if it has not ended yet.
async fn to_end<G: Future>(guest: Pin<&mut G>, ended: &mut Option<G::Output>) -> G::Output {
    match ended.take() {
        Some(output) => output,
        None => guest.await,
    }
}

fn classify(
    err: wasmtime::Error,
    memory_hit: bool,
    max_memory: u64,
    timeout: Duration,
) -> CallError {
    if matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        CallError::Timeout(timeout)
    } else if memory_hit {
        CallError::MemoryCap(max_memory)
    } else {
        CallError::Trap(format!("{err:#}"))
    }
}
