//! `zmoe serve` end to end: the real binary on a free local port with the tiny model, spoken
//! to over raw HTTP/1.1 (std's TcpStream: no client crate needed for tests). Streaming and
//! not, both endpoints, stop strings and token sequences, seeds, logprobs, every bad input,
//! the bounded queue, disconnects, the API key, 32 concurrent streams, and the official
//! `openai` Python client (tests/client/openai_client.py).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zmoe::checkpoint::synth::SynthQuant;

/// A running `zmoe serve`; killed when dropped.
struct Server {
    child: Child,
    addr: String,
    /// Everything it printed to stderr (drained by a thread so it never blocks).
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        Server::start_on("cpu", model, args)
    }

    fn start_on(backend: &str, model: &Path, args: &[&str]) -> Server {
        // On the GPU machine the binary is elsewhere (scripts/gpu_test.sh sets ZMOE_BIN).
        let exe = std::env::var_os("ZMOE_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_zmoe").into());
        let mut child = Command::new(exe)
            .args(["serve", "--model", common::s(model), "--backend", backend, "--port", "0"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start zmoe serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("zmoe serve did not start:\n{}", log.lock().unwrap())
        });
        Server { child, addr, log }
    }

    /// One request; returns (status, lower-cased headers, body).
    fn request(&self, method: &str, path: &str, body: Option<&str>, headers: &[&str]) -> (u16, String, String) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let body = body.unwrap_or("");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        for h in headers {
            req += &format!("{h}\r\n");
        }
        req += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, String, String) {
        self.request("POST", path, Some(&body.to_string()), &[])
    }

    /// A JSON answer with status 200.
    fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, _, text) = self.post(path, body);
        assert_eq!(status, 200, "{body} -> {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// A streamed answer: the `data:` payloads in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, headers, text) = self.post(path, body);
        assert_eq!(status, 200, "{body} -> {text}");
        assert!(headers.contains("content-type: text/event-stream"), "{headers}");
        sse_data(&text)
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, _, text) = self.request("GET", "/metrics", None, &[]);
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Splits a raw HTTP/1.1 response; decodes a chunked body.
fn parse_response(raw: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response head");
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = head.to_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, headers, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out += &rest[..n];
        s = &rest[n + 2..];
    }
    out
}

/// The payloads of `data:` lines of an event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(String::from)
        .collect()
}

fn model_dir() -> &'static Path {
    common::shared_tiny(SynthQuant::Affine4, 9)
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// The text of every chunk and the chunks parsed, checking the shape of a finished stream:
/// (chat) the first chunk carries the role, the last choice chunk the finish reason and no
/// content, an optional usage chunk with no choices, then `[DONE]`.
fn check_stream(data: &[String], chat: bool, usage: bool) -> (String, String, Option<Value>) {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    assert!(chunks.iter().all(|c| c["object"] == object && c["id"] == chunks[0]["id"]));
    let mut choice_chunks: Vec<&Value> = chunks.iter().collect();
    let usage_chunk = if usage {
        let u = choice_chunks.pop().unwrap();
        assert_eq!(u["choices"], json!([]));
        assert!(choice_chunks.iter().all(|c| c["usage"].is_null() && c.get("usage").is_some()));
        Some(u["usage"].clone())
    } else {
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        None
    };
    let last = choice_chunks.pop().unwrap();
    let finish = last["choices"][0]["finish_reason"].as_str().unwrap().to_string();
    if chat {
        assert_eq!(choice_chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(last["choices"][0]["delta"], json!({}));
    } else {
        assert_eq!(last["choices"][0]["text"], "");
    }
    assert!(choice_chunks.iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    let text = choice_chunks
        .iter()
        .map(|c| {
            let ch = &c["choices"][0];
            if chat {
                ch["delta"]["content"].as_str().unwrap_or("").to_string()
            } else {
                ch["text"].as_str().unwrap().to_string()
            }
        })
        .collect();
    (text, finish, usage_chunk)
}

#[test]
fn chat_and_completions_streaming_and_not() {
    let dir = model_dir();
    let srv = Server::start(dir, &[]);
    let m = name(dir);
    assert_eq!(srv.request("GET", "/health", None, &[]).0, 200);
    let models: Value = serde_json::from_str(&srv.request("GET", "/v1/models", None, &[]).2).unwrap();
    assert_eq!(models["data"][0]["id"], m.as_str());
    assert_eq!(srv.request("GET", &format!("/v1/models/{m}"), None, &[]).0, 200);

    // Non-streaming chat: the OpenAI shape, usage adds up.
    let chat = json!({"model": m, "messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three experts."}], "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let r = srv.ok("/v1/chat/completions", &chat);
    assert_eq!(r["object"], "chat.completion");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let c = &r["choices"][0];
    assert_eq!((c["index"].as_u64(), c["message"]["role"].as_str()), (Some(0), Some("assistant")));
    assert_eq!(c["finish_reason"], "length");
    let text = c["message"]["content"].as_str().unwrap().to_string();
    let u = &r["usage"];
    assert_eq!(u["completion_tokens"], 12);
    assert!(u["prompt_tokens"].as_u64().unwrap() > 10, "the chat template wraps the messages");
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + 12));

    // Streaming the same greedy request gives the same text; usage chunk when asked.
    let mut s = chat.clone();
    s["stream"] = json!(true);
    let (streamed, finish, usage) = check_stream(&srv.stream("/v1/chat/completions", &s), true, false);
    assert_eq!((streamed.as_str(), finish.as_str(), usage), (text.as_str(), "length", None));
    s["stream_options"] = json!({"include_usage": true});
    let (streamed, _, usage) = check_stream(&srv.stream("/v1/chat/completions", &s), true, true);
    assert_eq!(streamed, text);
    assert_eq!(&usage.unwrap(), u);

    // Completions: token-id prompt, its greedy tokens are `zmoe generate`'s (the library alone).
    let model = zmoe::Model::load(dir).unwrap();
    let plan = zmoe::plan::Plan::reference(model.config());
    let mut be = model.backend(zmoe::BackendKind::Cpu, plan).unwrap();
    let prompt: Vec<u32> = vec![17, 300, 5, 911, 42];
    let opts = zmoe::generate::GenerateOptions { max_tokens: 10, sampling: Default::default(), ignore_eos: true };
    let ids = zmoe::generate::generate(be.as_mut(), &prompt, &opts, |_| {}).unwrap().tokens;
    let tok = zmoe::tokenizer::load(&model.tokenizer_path()).unwrap();
    let want = tok.decode(&ids, true).unwrap();
    let comp =
        json!({"model": m, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": 2});
    let r = srv.ok("/v1/completions", &comp);
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["text"], want.as_str());
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 10);
    assert!(lp["top_logprobs"].as_array().unwrap().iter().all(|t| t.as_object().unwrap().len() <= 2));
    assert!(lp["token_logprobs"].as_array().unwrap().iter().all(|x| x.as_f64().unwrap() <= 0.0));
    let mut cs = comp.clone();
    cs["stream"] = json!(true);
    let (streamed, finish, _) = check_stream(&srv.stream("/v1/completions", &cs), false, false);
    assert_eq!((streamed.as_str(), finish.as_str()), (want.as_str(), "length"));

    // Stop token sequence: generation ends at ids[3..5], which are not output.
    let mut st = comp.clone();
    st["stop"] = json!([[ids[3], ids[4]]]);
    let r = srv.ok("/v1/completions", &st);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["usage"]["completion_tokens"], 5);
    assert_eq!(r["choices"][0]["text"], tok.decode(&ids[..3], true).unwrap().as_str());
    // Stops that only begin to match are held back, then output after all: a token sequence
    // whose first id appears but not the second, a string whose start ends the output.
    let tail: String = want.chars().rev().take(2).collect::<Vec<_>>().into_iter().rev().collect();
    let mut almost = comp.clone();
    almost["stop"] = json!([[ids[2], (ids[3] + 1) % 1000], format!("{tail}\u{1}never")]);
    for stream in [false, true] {
        almost["stream"] = json!(stream);
        let text = if stream {
            check_stream(&srv.stream("/v1/completions", &almost), false, false).0
        } else {
            srv.ok("/v1/completions", &almost)["choices"][0]["text"].as_str().unwrap().to_string()
        };
        assert_eq!(text, want, "held-back stops must be released (stream {stream})");
    }
    // Stop string: a piece of the greedy text; the output is what comes before it.
    let cut = want.char_indices().nth(want.chars().count() / 2).unwrap().0;
    let stop: String = want[cut..].chars().take(3).collect();
    let before = &want[..want.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut st = comp.clone();
        st["stop"] = json!(["never-in-the-output", stop]);
        st["stream"] = json!(stream);
        let (text, finish) = if stream {
            let (t, f, _) = check_stream(&srv.stream("/v1/completions", &st), false, false);
            (t, f)
        } else {
            let r = srv.ok("/v1/completions", &st);
            (r["choices"][0]["text"].as_str().unwrap().to_string(), r["choices"][0]["finish_reason"].to_string())
        };
        assert_eq!(text, before, "stop {stop:?} (stream {stream})");
        assert!(finish.contains("stop"));
    }

    // Seeded sampling repeats; another seed differs.
    let sampled = |seed: u64| {
        let b = json!({"model": m, "prompt": "The router", "max_tokens": 16, "temperature": 1.0, "seed": seed, "ignore_eos": true});
        srv.ok("/v1/completions", &b)["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(sampled(7), sampled(7));
    assert_ne!(sampled(7), sampled(8));

    // Chat logprobs: one entry per token, top_logprobs of the size asked.
    let mut lc = chat.clone();
    lc["logprobs"] = json!(true);
    lc["top_logprobs"] = json!(3);
    let r = srv.ok("/v1/chat/completions", &lc);
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 12);
    assert!(content.iter().all(|e| e["top_logprobs"].as_array().unwrap().len() == 3 && e["bytes"].is_array()));
    // The tokens' bytes spell the text (a token inside a multi-byte character has its bytes).
    let bytes: Vec<u8> =
        content.iter().flat_map(|e| e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8)).collect();
    assert_eq!(String::from_utf8_lossy(&bytes), r["choices"][0]["message"]["content"].as_str().unwrap());

    // /metrics counted all of it.
    assert!(srv.metric("zmoe_requests_finished_total") >= 10.0);
    assert!(srv.metric("zmoe_generation_tokens_total") > 100.0);
    assert!(srv.metric("zmoe_decode_tokens_per_second") > 0.0);
    assert_eq!(srv.metric("zmoe_slots"), 4.0);
}

#[test]
fn every_bad_input_is_an_openai_error_and_the_server_stays_up() {
    let dir = model_dir();
    let srv = Server::start(dir, &["--ctx", "48"]);
    let m = name(dir);
    let user = json!([{"role": "user", "content": "hello"}]);
    let long: Vec<u32> = (0..60).map(|i| (i * 13 + 7) % 1000).collect();
    // (path, body, status, error.param, error.code)
    type Case<'a> = (&'a str, String, u16, Option<&'a str>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("/v1/chat/completions", "{\"model\": ".into(), 400, None, None),
        ("/v1/chat/completions", "[1, 2]".into(), 400, None, None),
        ("/v1/chat/completions", json!({"model": m, "messages": "hi"}).to_string(), 400, Some("messages"), None),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": user, "temperature": "warm"}).to_string(),
            400,
            Some("temperature"),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": user, "stream": 1}).to_string(),
            400,
            Some("stream"),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": user}).to_string(),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": user, "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": user, "max_tokens": -5}).to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        ("/v1/chat/completions", json!({"model": m, "messages": user, "n": 3}).to_string(), 400, Some("n"), None),
        (
            "/v1/completions",
            json!({"model": m, "prompt": long}).to_string(),
            400,
            Some("prompt"),
            Some("context_length_exceeded"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x ".repeat(100)}).to_string(),
            400,
            Some("prompt"),
            Some("context_length_exceeded"),
        ),
        ("/v1/completions", json!({"model": m, "prompt": [5, 99999]}).to_string(), 400, Some("prompt"), None),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "hi", "stop": [[1, 99999]]}).to_string(),
            400,
            Some("stop"),
            None,
        ),
        ("/v1/completions", json!({"model": m, "prompt": ""}).to_string(), 400, Some("prompt"), None),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "hi", "max_tokens": 1.5}).to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        ("/v1/embeddings", json!({"model": m, "input": "x"}).to_string(), 404, None, None),
    ];
    for (path, body, status, param, code) in &cases {
        let (got, headers, text) = srv.request("POST", path, Some(body), &[]);
        assert_eq!(got, *status, "{path} {body} -> {text}");
        assert!(headers.contains("content-type: application/json"), "{headers}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{body}: not JSON ({e}): {text}"));
        let err = &v["error"];
        assert!(err["message"].as_str().is_some_and(|s| !s.is_empty()), "{text}");
        assert!(err["type"].is_string(), "{text}");
        assert_eq!(err["param"].as_str(), *param, "{body}: {text}");
        assert_eq!(err["code"].as_str(), *code, "{body}: {text}");
    }
    assert_eq!(srv.request("GET", "/v1/chat/completions", None, &[]).0, 405);
    // Still serving, and the errors were counted.
    let ok = srv.ok("/v1/completions", &json!({"model": m, "prompt": "hi", "max_tokens": 3}));
    assert_eq!(ok["usage"]["completion_tokens"].as_u64().map(|n| n <= 3), Some(true));
    assert_eq!(srv.metric("zmoe_request_errors_total"), (cases.len() - 1) as f64);
    assert!(!srv.log.lock().unwrap().contains("panicked"));
}

/// Opens a streaming request and reads until its first token chunk; returns the socket.
fn open_stream(srv: &Server, body: &Value) -> TcpStream {
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    let body = body.to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < 2 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

fn wait_for(what: &str, srv: &Server, cond: impl Fn(&Server) -> bool) {
    let t = Instant::now();
    while !cond(srv) {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out waiting for {what}\n{}", srv.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn full_queue_is_429_and_a_disconnect_frees_the_slot() {
    let dir = model_dir();
    let srv = Server::start(dir, &["--parallel", "1", "--queue", "1"]);
    let m = name(dir);
    // Endless streams (ignore_eos, the whole context): only a disconnect ends them early.
    let endless = json!({"model": m, "prompt": "go", "max_tokens": 1_000_000, "stream": true, "ignore_eos": true, "temperature": 0});
    let first = open_stream(&srv, &endless);
    assert_eq!(srv.metric("zmoe_active_slots"), 1.0);
    // The second waits in the queue (one place); the third is refused at once.
    let waiting = std::thread::spawn({
        let (addr, body) = (srv.addr.clone(), endless.to_string());
        move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let req =
                format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            s.write_all(req.as_bytes()).unwrap();
            s
        }
    })
    .join()
    .unwrap();
    wait_for("the queued request", &srv, |s| s.metric("zmoe_queue_depth") == 1.0);
    let (status, headers, text) = srv.post("/v1/completions", &json!({"model": m, "prompt": "hi", "max_tokens": 2}));
    assert_eq!(status, 429, "{text}");
    assert!(headers.contains("retry-after: 1"), "{headers}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(srv.metric("zmoe_requests_rejected_total"), 1.0);
    // The first client goes away: its slot goes to the queued request, right away.
    drop(first);
    wait_for("the queued request to get the slot", &srv, |s| {
        s.metric("zmoe_queue_depth") == 0.0 && s.metric("zmoe_requests_cancelled_total") == 1.0
    });
    assert_eq!(srv.metric("zmoe_active_slots"), 1.0);
    drop(waiting);
    wait_for("every slot free", &srv, |s| s.metric("zmoe_active_slots") == 0.0);
    assert_eq!(srv.metric("zmoe_requests_cancelled_total"), 2.0);
    // Nothing left behind: a new request runs at once.
    let r = srv.ok("/v1/completions", &json!({"model": m, "prompt": "hi", "max_tokens": 2, "ignore_eos": true}));
    assert_eq!(r["usage"]["completion_tokens"], 2);
}

#[test]
fn api_key_is_required_when_set() {
    let dir = model_dir();
    let srv = Server::start(dir, &["--api-key", "s3cret"]);
    let m = name(dir);
    let body = json!({"model": m, "prompt": "hi", "max_tokens": 2}).to_string();
    for auth in [&[][..], &["Authorization: Bearer wrong"][..], &["Authorization: s3cret"][..]] {
        let (status, _, text) = srv.request("POST", "/v1/completions", Some(&body), auth);
        assert_eq!(status, 401, "{auth:?}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    assert_eq!(srv.request("GET", "/v1/models", None, &[]).0, 401);
    assert_eq!(srv.request("POST", "/v1/completions", Some(&body), &["Authorization: Bearer s3cret"]).0, 200);
    assert_eq!(srv.request("GET", "/v1/models", None, &["Authorization: Bearer s3cret"]).0, 200);
    assert_eq!(srv.request("GET", "/health", None, &[]).0, 200);
}

/// The bounded load test: 32 concurrent streaming clients on 16 slots all complete, none
/// lost, and each greedy result is the same request's result run alone (batch invariance).
#[test]
fn thirty_two_concurrent_streams_are_batch_invariant() {
    concurrent_streams("cpu");
}

/// The load test on the GPU (CUDA slots), through `zmoe serve --backend cuda`.
#[test]
#[ignore]
fn thirty_two_concurrent_streams_on_gpu() {
    concurrent_streams("cuda");
}

fn concurrent_streams(backend: &str) {
    let dir = model_dir();
    let srv = Arc::new(Server::start_on(backend, dir, &["--parallel", "16", "--prefill-chunk", "16"]));
    let m = name(dir);
    let body = |i: usize| {
        let words: Vec<String> = (0..1 + i % 7).map(|k| format!("w{}", (i * 31 + k * 7) % 97)).collect();
        json!({"model": m, "messages": [{"role": "user", "content": words.join(" ")}],
            "max_tokens": 12 + i % 9, "temperature": 0, "ignore_eos": true, "stream": true,
            "stream_options": {"include_usage": true}})
    };
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let (srv, b) = (srv.clone(), body(i));
            std::thread::spawn(move || check_stream(&srv.stream("/v1/chat/completions", &b), true, true))
        })
        .collect();
    let together: Vec<(String, String, Option<Value>)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, (text, finish, usage)) in together.iter().enumerate() {
        assert_eq!(finish, "length");
        assert_eq!(usage.as_ref().unwrap()["completion_tokens"].as_u64(), Some(12 + i as u64 % 9));
        let (alone, _, _) = check_stream(&srv.stream("/v1/chat/completions", &body(i)), true, true);
        assert_eq!(text, &alone, "request {i}: tokens differ amid 31 others from alone");
    }
    assert_eq!(srv.metric("zmoe_requests_finished_total"), 64.0);
    assert_eq!(srv.metric("zmoe_requests_rejected_total"), 0.0);
}

/// The official `openai` Python client against the server (tests/client/openai_client.py):
/// .ci/run installs it into a venv and sets ZMOE_CLIENT_PYTHON to that venv's python.
#[test]
fn openai_python_client() {
    let Some(python) = std::env::var_os("ZMOE_CLIENT_PYTHON") else {
        eprintln!(
            "\n*** SKIPPED openai_python_client: ZMOE_CLIENT_PYTHON is not set. .ci/run sets it after \
             installing tests/client/requirements.txt into scratch/client-venv. ***\n"
        );
        return;
    };
    let dir = model_dir();
    let srv = Server::start(dir, &["--api-key", "test-key"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/client/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--base-url", &format!("http://{}/v1", srv.addr), "--api-key", "test-key", "--model", &name(dir)])
        .output()
        .expect("run the openai client script");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        srv.log.lock().unwrap()
    );
    assert!(stdout.contains("openai client: all checks passed"), "{stdout}");
    println!("{stdout}");
}

#[test]
fn a_non_streaming_client_that_leaves_frees_its_slot() {
    let dir = model_dir();
    let srv = Server::start(dir, &["--parallel", "1"]);
    let body = json!({"model": name(dir), "prompt": "go", "max_tokens": 1_000_000, "ignore_eos": true}).to_string();
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    let req = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    wait_for("the request to take the slot", &srv, |s| s.metric("zmoe_active_slots") == 1.0);
    drop(s);
    wait_for("the slot to be freed", &srv, |s| {
        s.metric("zmoe_active_slots") == 0.0 && s.metric("zmoe_requests_cancelled_total") == 1.0
    });
    assert_eq!(srv.metric("zmoe_requests_finished_total"), 0.0);
}
