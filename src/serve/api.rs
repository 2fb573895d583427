//! The OpenAI wire format: parsing requests (with an OpenAI-style error naming the parameter
//! for every bad one) and building responses and stream chunks exactly as the `openai`
//! Python client reads them.
//!
//! Requests are read field by field from a `serde_json::Value` rather than derived, because
//! the errors are part of the API: "`temperature` must be a number between 0 and 2" with
//! `param: "temperature"` is what a client shows its user; a derived deserializer can only say
//! where in the text it stopped. Unknown fields are ignored, as other local servers do (editor
//! plugins send penalties and tools the server does not use).

use serde_json::{Map, Value, json};

use crate::chat::Message;
use crate::generate::FinishReason;

use super::engine::TokenLogprob;

/// An error response: status, and the body's `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What is wrong, for a human.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400 invalid_request_error about `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    /// An error with no parameter at fault.
    pub fn new(status: u16, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code, retry_after: None }
    }

    /// The same error with a `Retry-After` of `secs`.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    /// The same error with a code.
    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

type Res<T> = std::result::Result<T, ApiError>;

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation for the chat template (`/v1/chat/completions`).
    Messages(Vec<Message>),
    /// Text to tokenize (`/v1/completions`).
    Text(String),
    /// Token ids given directly (`/v1/completions`).
    Tokens(Vec<u32>),
}

/// A parsed generation request (either endpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// `/v1/chat/completions` (else `/v1/completions`).
    pub chat: bool,
    /// The model asked for.
    pub model: String,
    /// What to continue.
    pub prompt: Prompt,
    /// `max_tokens` / `max_completion_tokens` (≥ 1), if given.
    pub max_tokens: Option<usize>,
    /// `temperature` (default 1, as OpenAI's).
    pub temperature: f32,
    /// `top_p` (default 1).
    pub top_p: f32,
    /// `top_k` (an extension; 0 = off).
    pub top_k: usize,
    /// `seed`, if given.
    pub seed: Option<u64>,
    /// Stop strings (`stop` entries that are strings; empty ones dropped).
    pub stop_strings: Vec<String>,
    /// Stop token sequences (`stop` entries that are arrays of token ids).
    pub stop_tokens: Vec<Vec<u32>>,
    /// Stream as server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Log-probabilities: `None`, or `Some(n)` alternatives per token.
    pub logprobs: Option<usize>,
    /// `ignore_eos` (an extension, as vLLM's): generate past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// A field's value, `null` read as absent.
fn field<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn integer(o: &Map<String, Value>, name: &str) -> Res<Option<i64>> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => {
            v.as_i64().map(Some).ok_or_else(|| ApiError::bad(name, format!("`{name}` must be an integer, got {v}")))
        }
    }
}

fn number(o: &Map<String, Value>, name: &str) -> Res<Option<f64>> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| ApiError::bad(name, format!("`{name}` must be a number, got {v}")))
        }
    }
}

fn boolean(o: &Map<String, Value>, name: &str) -> Res<bool> {
    match field(o, name) {
        None => Ok(false),
        Some(v) => v.as_bool().ok_or_else(|| ApiError::bad(name, format!("`{name}` must be true or false, got {v}"))),
    }
}

fn string<'a>(o: &'a Map<String, Value>, name: &str) -> Res<Option<&'a str>> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => {
            v.as_str().map(Some).ok_or_else(|| ApiError::bad(name, format!("`{name}` must be a string, got {v}")))
        }
    }
}

/// A JSON array of token ids.
fn token_ids(v: &Value, param: &str) -> Res<Vec<u32>> {
    let bad = || ApiError::bad(param, format!("`{param}` token sequences must be arrays of token ids (integers ≥ 0)"));
    let arr = v.as_array().ok_or_else(bad)?;
    arr.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)).collect()
}

/// Parses a request body for `/v1/chat/completions` (`chat`) or `/v1/completions`.
pub fn parse(body: &Value, chat: bool) -> Res<GenRequest> {
    let o = body
        .as_object()
        .ok_or_else(|| ApiError::new(400, "invalid_request_error", None, "the request body must be a JSON object"))?;
    let model = string(o, "model")?.ok_or_else(|| ApiError::bad("model", "`model` is required"))?.to_string();
    if let Some(n) = integer(o, "n")?
        && n != 1
    {
        return Err(ApiError::bad("n", format!("only n = 1 is supported, got n = {n}")));
    }
    if chat && field(o, "tools").is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(ApiError::bad("tools", "tools are not supported"));
    }
    if !chat {
        if boolean(o, "echo")? {
            return Err(ApiError::bad("echo", "echo is not supported"));
        }
        if string(o, "suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad("suffix", "suffix is not supported"));
        }
        if integer(o, "best_of")?.is_some_and(|b| b != 1) {
            return Err(ApiError::bad("best_of", "only best_of = 1 is supported"));
        }
    }
    let prompt = if chat { Prompt::Messages(messages(o)?) } else { prompt(o)? };
    // max_completion_tokens is the newer name; either may be sent.
    let mut max_tokens = None;
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = integer(o, name)? {
            if n < 1 {
                return Err(ApiError::bad(name, format!("`{name}` must be at least 1, got {n}")));
            }
            max_tokens = Some(n as usize);
        }
    }
    if !chat && max_tokens.is_none() {
        max_tokens = Some(16); // OpenAI's default for /v1/completions
    }
    let temperature = number(o, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature", format!("`temperature` must be between 0 and 2, got {temperature}")));
    }
    let top_p = number(o, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", format!("`top_p` must be in (0, 1], got {top_p}")));
    }
    let top_k = integer(o, "top_k")?.unwrap_or(0);
    if top_k < 0 {
        return Err(ApiError::bad("top_k", format!("`top_k` must be ≥ 0 (0 = off), got {top_k}")));
    }
    let seed = integer(o, "seed")?.map(|s| s as u64);
    let (stop_strings, stop_tokens) = stop(o)?;
    let stream = boolean(o, "stream")?;
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => boolean(so, "include_usage")?,
        Some(v) => return Err(ApiError::bad("stream_options", format!("`stream_options` must be an object, got {v}"))),
    };
    let logprobs = if chat {
        let on = boolean(o, "logprobs")?;
        let top = integer(o, "top_logprobs")?;
        match top {
            Some(n) if !(0..=20).contains(&n) => {
                return Err(ApiError::bad("top_logprobs", format!("`top_logprobs` must be between 0 and 20, got {n}")));
            }
            Some(_) if !on => return Err(ApiError::bad("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
            _ => on.then_some(top.unwrap_or(0) as usize),
        }
    } else {
        match integer(o, "logprobs")? {
            Some(n) if !(0..=5).contains(&n) => {
                return Err(ApiError::bad("logprobs", format!("`logprobs` must be between 0 and 5, got {n}")));
            }
            n => n.map(|n| n as usize),
        }
    };
    string(o, "user")?;
    let ignore_eos = boolean(o, "ignore_eos")?;
    Ok(GenRequest {
        chat,
        model,
        prompt,
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: top_k as usize,
        seed,
        stop_strings,
        stop_tokens,
        stream,
        include_usage,
        logprobs,
        ignore_eos,
    })
}

/// `messages`: a non-empty array of `{role, content}`, content a string or text parts.
fn messages(o: &Map<String, Value>) -> Res<Vec<Message>> {
    let bad = |m: String| ApiError::bad("messages", m);
    let list = field(o, "messages").ok_or_else(|| bad("`messages` is required".into()))?;
    let list = list.as_array().ok_or_else(|| bad(format!("`messages` must be an array, got {list}")))?;
    if list.is_empty() {
        return Err(bad("`messages` must not be empty".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let m =
            m.as_object().ok_or_else(|| bad(format!("messages[{i}] must be an object with `role` and `content`")))?;
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant")) => r,
            Some("developer") => "system",
            Some(r) => return Err(bad(format!("messages[{i}].role `{r}` is not supported (system, user, assistant)"))),
            None => return Err(bad(format!("messages[{i}].role must be a string"))),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => return Err(bad(format!("messages[{i}].content: only text parts are supported"))),
                    }
                }
                text
            }
            _ => return Err(bad(format!("messages[{i}].content must be a string or an array of text parts"))),
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// `prompt` of `/v1/completions`: a string, token ids, or a one-element array of either.
fn prompt(o: &Map<String, Value>) -> Res<Prompt> {
    let bad = |m: &str| ApiError::bad("prompt", m);
    let p = field(o, "prompt").ok_or_else(|| bad("`prompt` is required"))?;
    let one = match p {
        Value::Array(a) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => &a[0],
        Value::Array(a) if a.len() > 1 && a.iter().all(|x| x.is_string() || x.is_array()) => {
            return Err(bad("only one prompt per request is supported"));
        }
        v => v,
    };
    match one {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(_) => Ok(Prompt::Tokens(token_ids(one, "prompt")?)),
        v => Err(ApiError::bad("prompt", format!("`prompt` must be a string or an array of token ids, got {v}"))),
    }
}

/// `stop`: a string, or an array of strings and token id arrays (or one token id array).
fn stop(o: &Map<String, Value>) -> Res<(Vec<String>, Vec<Vec<u32>>)> {
    let (mut strings, mut tokens) = (Vec::new(), Vec::new());
    match field(o, "stop") {
        None => {}
        Some(Value::String(s)) => strings.push(s.clone()),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) && !a.is_empty() => {
            tokens.push(token_ids(&Value::Array(a.clone()), "stop")?)
        }
        Some(Value::Array(a)) => {
            for x in a {
                match x {
                    Value::String(s) => strings.push(s.clone()),
                    Value::Array(_) => tokens.push(token_ids(x, "stop")?),
                    v => {
                        return Err(ApiError::bad(
                            "stop",
                            format!("`stop` entries must be strings or token id arrays, got {v}"),
                        ));
                    }
                }
            }
        }
        Some(v) => return Err(ApiError::bad("stop", format!("`stop` must be a string or an array, got {v}"))),
    }
    strings.retain(|s| !s.is_empty());
    tokens.retain(|t| !t.is_empty());
    Ok((strings, tokens))
}

/// `usage`.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
pub fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let top: Vec<Value> =
                lp.top.iter().map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes})).collect();
            json!({
                "token": lp.chosen.token,
                "logprob": lp.chosen.logprob,
                "bytes": lp.chosen.bytes,
                "top_logprobs": top,
            })
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions `logprobs`: parallel arrays `tokens`, `token_logprobs`, `top_logprobs` (one
/// `{token: logprob}` object per token) and `text_offset` (from `offset`, in characters).
pub fn completion_logprobs(lps: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(lps.len());
    for lp in lps {
        offsets.push(at);
        at += lp.chosen.token.chars().count();
    }
    let top: Vec<Value> = lps
        .iter()
        .map(|lp| Value::Object(lp.top.iter().map(|t| (t.token.clone(), Value::from(t.logprob))).collect()))
        .collect();
    json!({
        "tokens": lps.iter().map(|lp| lp.chosen.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|lp| lp.chosen.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// Identity of one response: id, creation time, model.
#[derive(Debug, Clone)]
pub struct Head {
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model's name.
    pub model: String,
}

/// The whole `chat.completion` object.
pub fn chat_response(h: &Head, text: &str, finish: FinishReason, logprobs: Option<Value>, usage: Value) -> Value {
    json!({
        "id": h.id, "object": "chat.completion", "created": h.created, "model": h.model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": logprobs,
            "finish_reason": finish.as_str(),
        }],
        "usage": usage,
    })
}

/// A `chat.completion.chunk`: `delta`, optional logprobs and finish reason; `usage` is
/// `null` on every chunk when the stream ends with a usage chunk (as OpenAI sends it).
pub fn chat_chunk(
    h: &Head,
    delta: Value,
    logprobs: Option<Value>,
    finish: Option<FinishReason>,
    usage_null: bool,
) -> Value {
    let mut v = json!({
        "id": h.id, "object": "chat.completion.chunk", "created": h.created, "model": h.model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish.map(FinishReason::as_str)}],
    });
    if usage_null {
        v["usage"] = Value::Null;
    }
    v
}

/// The whole `text_completion` object.
pub fn completion_response(h: &Head, text: &str, finish: FinishReason, logprobs: Option<Value>, usage: Value) -> Value {
    json!({
        "id": h.id, "object": "text_completion", "created": h.created, "model": h.model,
        "system_fingerprint": null,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish.as_str()}],
        "usage": usage,
    })
}

/// A streamed `text_completion` chunk.
pub fn completion_chunk(
    h: &Head,
    text: &str,
    logprobs: Option<Value>,
    finish: Option<FinishReason>,
    usage_null: bool,
) -> Value {
    let mut v = json!({
        "id": h.id, "object": "text_completion", "created": h.created, "model": h.model,
        "system_fingerprint": null,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish.map(FinishReason::as_str)}],
    });
    if usage_null {
        v["usage"] = Value::Null;
    }
    v
}

/// The last chunk of a stream with `include_usage`: no choices, the usage.
pub fn usage_chunk(h: &Head, chat: bool, usage: Value) -> Value {
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    json!({
        "id": h.id, "object": object, "created": h.created, "model": h.model,
        "system_fingerprint": null, "choices": [], "usage": usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: Value, chat: bool) -> ApiError {
        parse(&body, chat).unwrap_err()
    }

    #[test]
    fn parses_a_full_chat_request() {
        let r = parse(
            &json!({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null}],
                "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": -1,
                "stop": ["\n", [1, 2], ""], "stream": true, "stream_options": {"include_usage": true},
                "logprobs": true, "top_logprobs": 3, "user": "u", "frequency_penalty": 0}),
            true,
        )
        .unwrap();
        let want =
            vec![Message::new("system", "be brief"), Message::new("user", "hi there"), Message::new("assistant", "")];
        assert_eq!(r.prompt, Prompt::Messages(want));
        assert_eq!((r.max_tokens, r.temperature, r.top_p, r.seed), (Some(5), 0.0, 0.5, Some(u64::MAX)));
        assert_eq!((r.stop_strings, r.stop_tokens), (vec!["\n".to_string()], vec![vec![1, 2]]));
        assert!(r.stream && r.include_usage);
        assert_eq!(r.logprobs, Some(3));
    }

    #[test]
    fn completions_defaults_and_prompt_forms() {
        let r = parse(&json!({"model": "m", "prompt": "once"}), false).unwrap();
        assert_eq!(
            (r.prompt, r.max_tokens, r.temperature, r.logprobs),
            (Prompt::Text("once".into()), Some(16), 1.0, None)
        );
        let r = parse(&json!({"model": "m", "prompt": [[5, 6]], "logprobs": 2, "stop": [7, 8]}), false).unwrap();
        assert_eq!((r.prompt, r.logprobs, r.stop_tokens), (Prompt::Tokens(vec![5, 6]), Some(2), vec![vec![7, 8]]));
        assert_eq!(parse(&json!({"model": "m", "prompt": [3]}), false).unwrap().prompt, Prompt::Tokens(vec![3]));
    }

    #[test]
    fn every_bad_field_names_its_param() {
        let chat = |extra: Value| {
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            b
        };
        for (body, param) in [
            (chat(json!({"max_tokens": 0})), "max_tokens"),
            (chat(json!({"max_tokens": -3})), "max_tokens"),
            (chat(json!({"max_tokens": "10"})), "max_tokens"),
            (chat(json!({"max_completion_tokens": 1.5})), "max_completion_tokens"),
            (chat(json!({"temperature": "hot"})), "temperature"),
            (chat(json!({"temperature": 2.5})), "temperature"),
            (chat(json!({"top_p": 0})), "top_p"),
            (chat(json!({"n": 2})), "n"),
            (chat(json!({"stream": "yes"})), "stream"),
            (chat(json!({"stop": 5})), "stop"),
            (chat(json!({"stop": [[1, -2]]})), "stop"),
            (chat(json!({"top_logprobs": 2})), "top_logprobs"),
            (chat(json!({"logprobs": true, "top_logprobs": 21})), "top_logprobs"),
            (chat(json!({"seed": "s"})), "seed"),
            (chat(json!({"model": 3})), "model"),
            (chat(json!({"messages": []})), "messages"),
            (chat(json!({"messages": [{"role": "tool", "content": "x"}]})), "messages"),
            (chat(json!({"messages": [{"role": "user", "content": 3}]})), "messages"),
            (chat(json!({"messages": "hi"})), "messages"),
            (json!({"messages": [{"role": "user", "content": "x"}]}), "model"),
            (json!({"model": "m", "prompt": ["a", "b"]}), "prompt"),
            (json!({"model": "m", "prompt": {"a": 1}}), "prompt"),
            (json!({"model": "m"}), "prompt"),
            (json!({"model": "m", "prompt": "x", "logprobs": 6}), "logprobs"),
            (json!({"model": "m", "prompt": "x", "echo": true}), "echo"),
        ] {
            let chat = body.get("messages").is_some() || body.get("prompt").is_none() && param != "prompt";
            let e = err(body.clone(), chat);
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {e:?}");
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
        assert_eq!(err(json!([1]), true).status, 400);
    }

    #[test]
    fn logprob_shapes() {
        use crate::serve::engine::TopLogprob;
        let t = |s: &str, l: f32| TopLogprob { token: s.into(), bytes: s.as_bytes().to_vec(), logprob: l };
        let lps = vec![
            TokenLogprob { chosen: t("ab", -0.5), top: vec![t("ab", -0.5), t("c", -1.5)] },
            TokenLogprob { chosen: t("é", -2.0), top: vec![t("x", -0.1), t("é", -2.0)] },
        ];
        let c = chat_logprobs(&lps);
        assert_eq!(c["content"][1]["bytes"], json!([0xc3, 0xa9]));
        assert_eq!(c["content"][0]["top_logprobs"][1]["token"], "c");
        let p = completion_logprobs(&lps, 3);
        assert_eq!(p["text_offset"], json!([3, 5]));
        assert_eq!(p["top_logprobs"][1]["x"], json!(-0.1f32));
        assert_eq!(p["tokens"], json!(["ab", "é"]));
    }
}
