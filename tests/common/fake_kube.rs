//! Just enough of a Kubernetes API server for the LoopPool publisher, honest about what it
//! checks: server-side apply (PATCH with `application/apply-patch+yaml`, a `fieldManager`, the
//! body parsed and its apiVersion, kind and name checked), objects stored with labels,
//! resourceVersion and creationTimestamp, the `status` subresource (NOT_FOUND for an absent
//! object, and a status sent to the main resource ignored, as with `subresources.status`),
//! list by label selector, and get. It can fail every request with a status code or drop
//! every connection unanswered (down), and it counts the requests it gets.
//!
//! Included with `#[path]` by the tests that use it, so the others do not build a server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

pub const PREFIX: &str = "/apis/loopvol.csi.dev/v1alpha1/looppools";

/// How the fake answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Up,
    /// Every request gets this HTTP status (500, 409, 503 ...) and a Status body.
    Fail(u16),
    /// Every connection is closed without an answer.
    Down,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub at: std::time::Instant,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<String, Value>,
    /// Per object: the field manager of each apply it got.
    managers: BTreeMap<String, Vec<String>>,
    requests: Vec<Seen>,
    mode: Option<Mode>,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

fn reply(status: u16, body: Value) -> hyper::Response<Body> {
    use http_body_util::BodyExt;
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn failure(code: u16, reason: &str, message: &str) -> hyper::Response<Body> {
    reply(
        code,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "reason": reason, "message": message, "code": code}),
    )
}

pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// `k=v,k2=v2` equality selectors (all the publisher uses); anything else is refused.
fn selects(selector: &str, obj: &Value) -> Result<bool, String> {
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (k, v) = term
            .split_once('=')
            .ok_or_else(|| format!("unsupported selector term {term:?}"))?;
        if obj["metadata"]["labels"][k].as_str() != Some(v) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl State {
    fn handle(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        ctype: &str,
        body: &[u8],
    ) -> hyper::Response<Body> {
        let Some(rest) = path.strip_prefix(PREFIX) else {
            return failure(404, "NotFound", &format!("no route {path}"));
        };
        let parts: Vec<&str> = rest
            .trim_start_matches('/')
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        match (method, parts.as_slice()) {
            ("GET", []) => {
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let mut items = Vec::new();
                for o in self.objects.values() {
                    match selects(&selector, o) {
                        Ok(true) => items.push(o.clone()),
                        Ok(false) => {}
                        Err(e) => return failure(400, "BadRequest", &e),
                    }
                }
                reply(
                    200,
                    json!({"apiVersion": "loopvol.csi.dev/v1alpha1", "kind": "LoopPoolList",
                    "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
                )
            }
            ("GET", [name]) => match self.objects.get(*name) {
                Some(o) => reply(200, o.clone()),
                None => failure(404, "NotFound", &format!("looppools {name:?} not found")),
            },
            ("PATCH", [name]) | ("PATCH", [name, "status"]) => {
                let status_sub = parts.len() == 2;
                if ctype != "application/apply-patch+yaml" {
                    return failure(
                        415,
                        "UnsupportedMediaType",
                        &format!("not an apply patch: {ctype}"),
                    );
                }
                let Some(manager) = query_param(query, "fieldManager") else {
                    return failure(400, "BadRequest", "an apply needs a fieldManager");
                };
                let patch: Value = match serde_norway::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return failure(400, "BadRequest", &format!("apply body: {e}")),
                };
                if patch["apiVersion"] != "loopvol.csi.dev/v1alpha1" || patch["kind"] != "LoopPool"
                {
                    return failure(400, "BadRequest", "apiVersion/kind of the apply body");
                }
                if patch["metadata"]["name"].as_str() != Some(name) {
                    return failure(400, "BadRequest", "metadata.name differs from the URL");
                }
                self.rv += 1;
                let rv = self.rv.to_string();
                let obj = match (self.objects.get_mut(*name), status_sub) {
                    (None, true) => {
                        return failure(404, "NotFound", &format!("looppools {name:?} not found"))
                    }
                    (None, false) => {
                        let mut o = json!({
                            "apiVersion": "loopvol.csi.dev/v1alpha1", "kind": "LoopPool",
                            "metadata": {"name": name, "uid": format!("uid-{name}"),
                                         "creationTimestamp": "2026-12-07T00:00:00Z", "labels": {}},
                        });
                        if let Some(l) = patch["metadata"]["labels"].as_object() {
                            o["metadata"]["labels"] = Value::Object(l.clone());
                        }
                        self.objects.insert(name.to_string(), o);
                        self.objects.get_mut(*name).unwrap()
                    }
                    (Some(o), false) => {
                        if let Some(l) = patch["metadata"]["labels"].as_object() {
                            for (k, v) in l {
                                o["metadata"]["labels"][k] = v.clone();
                            }
                        }
                        o
                    }
                    (Some(o), true) => {
                        // One manager owns the whole status: its apply is the status.
                        o["status"] = patch["status"].clone();
                        o
                    }
                };
                obj["metadata"]["resourceVersion"] = rv.into();
                let out = obj.clone();
                self.managers
                    .entry(name.to_string())
                    .or_default()
                    .push(manager);
                reply(if status_sub { 200 } else { 201 }, out)
            }
            _ => failure(405, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        use http_body_util::BodyExt;
        let state = Arc::new(Mutex::new(State {
            mode: Some(Mode::Up),
            ..Default::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move {
                                let method = req.method().to_string();
                                let path = req.uri().path().to_string();
                                let query = req.uri().query().unwrap_or("").to_string();
                                let ctype = req
                                    .headers()
                                    .get("content-type")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let mut st = state.lock().unwrap();
                                st.requests.push(Seen {
                                    method: method.clone(),
                                    path: path.clone(),
                                    query: query.clone(),
                                    content_type: ctype.clone(),
                                    at: std::time::Instant::now(),
                                });
                                let resp = match st.mode.unwrap() {
                                    Mode::Up => st.handle(&method, &path, &query, &ctype, &body),
                                    Mode::Fail(code) => failure(
                                        code,
                                        if code == 409 {
                                            "Conflict"
                                        } else {
                                            "InternalError"
                                        },
                                        "fake API server told to fail",
                                    ),
                                    Mode::Down => return Err("down"),
                                };
                                Ok::<_, &'static str>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeKube { addr, state, task }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = Some(mode);
    }

    /// The stored object, if any.
    pub fn object(&self, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.state.lock().unwrap().objects.keys().cloned().collect()
    }

    /// The field managers of every apply `name` got.
    pub fn managers(&self, name: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .managers
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Store an object as if someone had created it earlier (another loopvol, an operator).
    pub fn insert(&self, obj: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        st.objects.insert(name, obj);
    }

    /// A kubeconfig pointing at the fake.
    pub fn kubeconfig(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 users:\n- name: node\n  user:\n    token: fake\ncontexts:\n- name: fake\n  context:\n    \
                 cluster: fake\n    user: node\ncurrent-context: fake\n",
                self.addr
            ),
        )
        .unwrap();
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}
