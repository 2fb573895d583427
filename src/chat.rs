//! Chat templates: a model folder's own Jinja template turns a conversation into the prompt
//! text the model was trained on.
//!
//! Shaped after what HuggingFace `transformers` does in `apply_chat_template`, because that
//! is what the template authors test against:
//!
//! - The template comes from `chat_template.jinja` if the folder has one (it wins, as in
//!   transformers), else from `tokenizer_config.json`'s `chat_template`: a string, or a list
//!   of `{name, template}` of which the one named `default` is taken.
//! - It is rendered with `trim_blocks` and `lstrip_blocks` on, `break`/`continue` allowed,
//!   and the globals transformers passes: `messages`, `add_generation_prompt`, `bos_token` /
//!   `eos_token` (from tokenizer_config.json, given as strings or as `{content: ...}` added-token
//!   objects; left undefined when absent, as transformers does), `raise_exception(msg)` and
//!   `strftime_now(format)`; `tojson` is transformers' (Python's `json.dumps`), not
//!   minijinja's HTML-safe one.
//! - Templates are written as if they were Python: they call `.startswith`, `.split`,
//!   `.strip`, `.items()` on values. minijinja has none of these methods, so the
//!   `minijinja-contrib` `pycompat` callback supplies them.
//! - The rendered text usually starts with the BOS token itself (DeepSeek) or needs none
//!   (Qwen, GLM): it is tokenized without adding special tokens
//!   ([`crate::tokenizer::encode`] never adds them), so BOS is never doubled.
//!
//! The template is compiled once when loaded, so a syntax error is reported before any
//! weights are read; every error names the file the template came from.

use std::path::{Path, PathBuf};

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The file that wins over tokenizer_config.json's `chat_template` when present.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
/// The tokenizer's config, holding `chat_template`, `bos_token` and `eos_token`.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// Detail prefix of the error `raise_exception` raises, to tell it from other template errors.
const RAISED: &str = "raise_exception: ";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A model's chat template with the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// The Jinja source.
    source: String,
    /// The file it came from (named in errors).
    origin: PathBuf,
    /// `bos_token` from tokenizer_config.json, if any.
    bos_token: Option<String>,
    /// `eos_token` from tokenizer_config.json, if any.
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Loads the chat template of model folder `dir` (see the module doc for where it is
    /// looked up) and checks that it compiles.
    pub fn load(dir: &Path) -> Result<ChatTemplate> {
        let cfg_path = dir.join(TOKENIZER_CONFIG);
        let cfg: Option<serde_json::Value> = if cfg_path.exists() {
            let text = crate::input::read_to_string(&cfg_path)?;
            Some(serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON ({e})")))?)
        } else {
            None
        };
        let token = |key: &str| -> Result<Option<String>> {
            match cfg.as_ref().and_then(|c| c.get(key)) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => match v.get("content").and_then(|c| c.as_str()) {
                    Some(s) => Ok(Some(s.to_string())),
                    None => Err(Error::format(
                        &cfg_path,
                        format!("`{key}` is neither a string nor an object with a string `content`"),
                    )),
                },
            }
        };
        let (bos_token, eos_token) = (token("bos_token")?, token("eos_token")?);
        let file = dir.join(TEMPLATE_FILE);
        let (source, origin) = if file.exists() {
            (crate::input::read_to_string(&file)?, file)
        } else {
            let source = match cfg.as_ref().and_then(|c| c.get("chat_template")) {
                Some(v) => template_field(&cfg_path, v)?,
                None => {
                    return Err(Error::format(
                        dir,
                        format!(
                            "no chat template: neither {TEMPLATE_FILE} nor a `chat_template` in {TOKENIZER_CONFIG} \
                             (needed for --chat)"
                        ),
                    ));
                }
            };
            (source, cfg_path)
        };
        let t = ChatTemplate { source, origin, bos_token, eos_token };
        t.check()?;
        Ok(t)
    }

    /// A template from its source text; `origin` is the file named in errors.
    pub fn from_source(
        source: impl Into<String>,
        origin: impl Into<PathBuf>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate> {
        let t = ChatTemplate { source: source.into(), origin: origin.into(), bos_token, eos_token };
        t.check()?;
        Ok(t)
    }

    /// The file the template came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The `bos_token` it is rendered with, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The `eos_token` it is rendered with, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders `messages` to prompt text; `add_generation_prompt` appends the opening of the
    /// assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let tmpl = env.template_from_named_str("chat_template", &self.source).map_err(|e| self.error(e))?;
        let ctx = context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().map(Value::from).unwrap_or(Value::UNDEFINED),
            eos_token => self.eos_token.as_deref().map(Value::from).unwrap_or(Value::UNDEFINED),
        };
        tmpl.render(ctx).map_err(|e| self.error(e))
    }

    /// Compiles the template (a syntax error is reported at load, not at the first render).
    fn check(&self) -> Result<()> {
        environment().template_from_named_str("chat_template", &self.source).map(|_| ()).map_err(|e| self.error(e))
    }

    /// A template error as a [`Error::Format`] naming the template's file.
    fn error(&self, e: minijinja::Error) -> Error {
        let why = match e.detail().and_then(|d| d.strip_prefix(RAISED)) {
            Some(msg) if e.kind() == ErrorKind::InvalidOperation => {
                format!("chat template raised an exception: {msg}")
            }
            _ => format!("chat template: {e}"),
        };
        Error::format(&self.origin, why)
    }
}

/// The template in tokenizer_config.json's `chat_template`: a string, or the `default` entry of
/// a list of `{name, template}`.
fn template_field(path: &Path, v: &serde_json::Value) -> Result<String> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_string());
    }
    let Some(list) = v.as_array() else {
        return Err(Error::format(path, "`chat_template` is neither a string nor a list of {name, template}"));
    };
    let mut names = Vec::new();
    for entry in list {
        let name = entry.get("name").and_then(|n| n.as_str());
        let template = entry.get("template").and_then(|t| t.as_str());
        match (name, template) {
            (Some("default"), Some(t)) => return Ok(t.to_string()),
            (Some(n), Some(_)) => names.push(n.to_string()),
            _ => return Err(Error::format(path, "`chat_template` list entries must be {name, template} strings")),
        }
    }
    Err(Error::format(path, format!("`chat_template` has no template named `default` (it has: {})", names.join(", "))))
}

/// The Jinja environment templates are rendered in (transformers' settings).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("default delimiters are valid");
    env.set_syntax(syntax);
    // HF templates call Python string and dict methods (`.startswith`, `.split`, `.strip`,
    // `.items()`); minijinja itself has no methods on values, pycompat supplies them.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{msg}")))
    });
    env.add_function("strftime_now", |fmt: String| strftime(&fmt, now_unix()));
    env.add_filter("tojson", tojson);
    env
}

/// transformers' `tojson`: Python's `json.dumps` (`", "` / `": "` separators, no HTML
/// escaping, non-ASCII kept unless `ensure_ascii=True`, `indent=N` pretty-printing), which
/// tool-calling templates write into the prompt. minijinja's own `tojson` escapes `<`, `>`,
/// `&` and `'` for HTML and refuses `ensure_ascii`, so its text would differ from the one the
/// model was trained on.
fn tojson(value: Value, indent: Option<usize>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    // Accepted for compatibility; maps keep minijinja's order.
    let _ = kwargs.get::<Option<bool>>("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let res = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser =
                serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(&pad));
            serde::Serialize::serialize(&value, &mut ser)
        }
        None => serde::Serialize::serialize(&value, &mut serde_json::Serializer::with_formatter(&mut out, PyCompact)),
    };
    res.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    if !ensure_ascii {
        return Ok(Value::from_safe_string(text));
    }
    let mut ascii = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            ascii.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                ascii += &format!("\\u{u:04x}");
            }
        }
    }
    Ok(Value::from_safe_string(ascii))
}

/// `json.dumps`' default separators: `", "` between items, `": "` after keys.
struct PyCompact;

impl serde_json::ser::Formatter for PyCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// Seconds since the Unix epoch (UTC).
fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A small `strftime` over UTC for `strftime_now` (templates use it for "today's date"):
/// `%Y %m %d %e %H %M %S %b %B %a %A %j %y %%`; other directives are kept as written.
fn strftime(fmt: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = crate::date::civil_date(days);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let month = MONTHS[(m - 1) as usize];
    let day = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y.rem_euclid(100)),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('e') => out += &format!("{d:>2}"),
            Some('j') => out += &format!("{yday:03}"),
            Some('H') => out += &format!("{:02}", secs / 3600),
            Some('M') => out += &format!("{:02}", secs / 60 % 60),
            Some('S') => out += &format!("{:02}", secs % 60),
            Some('B') => out += month,
            Some('b') => out += &month[..3],
            Some('A') => out += day,
            Some('a') => out += &day[..3],
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    /// A fresh random word, so no test passes on a constant.
    fn word(rng: &mut Rng) -> String {
        (0..8).map(|_| char::from(b'a' + (rng.next_u64() % 26) as u8)).collect()
    }

    fn seeded() -> Rng {
        Rng::new(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
    }

    fn write_config(dir: &Path, v: serde_json::Value) {
        std::fs::write(dir.join(TOKENIZER_CONFIG), v.to_string()).unwrap();
    }

    #[test]
    fn renders_with_and_without_system_and_generation_prompt() {
        let mut rng = seeded();
        let (sys, user) = (word(&mut rng), word(&mut rng));
        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path(), serde_json::json!({"chat_template": CHATML, "eos_token": "<|im_end|>"}));
        let t = ChatTemplate::load(tmp.path()).unwrap();
        assert_eq!(t.eos_token(), Some("<|im_end|>"));
        let msgs = [Message::new("system", &sys), Message::new("user", format!("  {user} "))];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            format!("<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        );
        assert_eq!(t.render(&msgs[1..], false).unwrap(), format!("<|im_start|>user\n{user}<|im_end|>\n"));
        // An assistant turn renders too.
        let a = word(&mut rng);
        let more = [Message::new("user", &user), Message::new("assistant", &a)];
        assert!(t.render(&more, false).unwrap().ends_with(&format!("<|im_start|>assistant\n{a}<|im_end|>\n")));
    }

    #[test]
    fn bos_and_eos_tokens_as_strings_or_objects_and_python_methods() {
        let mut rng = seeded();
        let (bos, eos, user) = (format!("<{}>", word(&mut rng)), format!("<{}>", word(&mut rng)), word(&mut rng));
        let tmp = tempfile::tempdir().unwrap();
        let src = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('x') %}{{ m.content.upper() }}\
{% else %}{{ m.content.split('a') | length }}{% endif %}{% endfor %}{{ eos_token }}";
        write_config(
            tmp.path(),
            serde_json::json!({"chat_template": src, "bos_token": {"__type": "AddedToken", "content": bos},
                               "eos_token": eos}),
        );
        let t = ChatTemplate::load(tmp.path()).unwrap();
        assert_eq!(t.bos_token(), Some(bos.as_str()));
        let (x, plain) = (format!("x{user}"), format!("b{user}a"));
        let want = format!("{bos}{}{}{eos}", x.to_uppercase(), plain.split('a').count());
        assert_eq!(t.render(&[Message::new("user", &x), Message::new("user", &plain)], true).unwrap(), want);
        // Without tokenizer_config tokens, bos_token renders as nothing (undefined).
        write_config(tmp.path(), serde_json::json!({"chat_template": "[{{ bos_token }}]"}));
        assert_eq!(ChatTemplate::load(tmp.path()).unwrap().render(&[], false).unwrap(), "[]");
    }

    #[test]
    fn raise_exception_is_a_clear_error_naming_the_template() {
        let mut rng = seeded();
        let msg = word(&mut rng);
        let tmp = tempfile::tempdir().unwrap();
        let src = format!("{{% if messages[0].role != 'user' %}}{{{{ raise_exception('{msg}') }}}}{{% endif %}}ok");
        write_config(tmp.path(), serde_json::json!({ "chat_template": src }));
        let t = ChatTemplate::load(tmp.path()).unwrap();
        assert_eq!(t.render(&[Message::new("user", "hi")], true).unwrap(), "ok");
        let e = t.render(&[Message::new("assistant", "hi")], true).unwrap_err().to_string();
        assert!(e.contains(TOKENIZER_CONFIG) && e.contains(&format!("raised an exception: {msg}")), "{e}");
    }

    #[test]
    fn list_form_takes_default_and_jinja_file_wins() {
        let mut rng = seeded();
        let (a, b, c) = (word(&mut rng), word(&mut rng), word(&mut rng));
        let tmp = tempfile::tempdir().unwrap();
        let list = serde_json::json!([{"name": "tool_use", "template": b}, {"name": "default", "template": a}]);
        write_config(tmp.path(), serde_json::json!({ "chat_template": list }));
        assert_eq!(ChatTemplate::load(tmp.path()).unwrap().render(&[], true).unwrap(), a);
        // chat_template.jinja wins over tokenizer_config.json.
        std::fs::write(tmp.path().join(TEMPLATE_FILE), &c).unwrap();
        let t = ChatTemplate::load(tmp.path()).unwrap();
        assert_eq!(t.render(&[], true).unwrap(), c);
        assert_eq!(t.origin(), tmp.path().join(TEMPLATE_FILE));
        // A list without `default` names what it has.
        std::fs::remove_file(tmp.path().join(TEMPLATE_FILE)).unwrap();
        write_config(tmp.path(), serde_json::json!({"chat_template": [{"name": "rag", "template": b}]}));
        let e = ChatTemplate::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("no template named `default`") && e.contains("rag"), "{e}");
    }

    #[test]
    fn missing_or_bad_templates_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let e = ChatTemplate::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("no chat template") && e.contains(TEMPLATE_FILE), "{e}");
        write_config(tmp.path(), serde_json::json!({"eos_token": "</s>"}));
        let e = ChatTemplate::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("no chat template"), "{e}");
        // A syntax error is reported at load, naming the file.
        std::fs::write(tmp.path().join(TEMPLATE_FILE), "{% for m in messages %}{{ m.content }}").unwrap();
        let e = ChatTemplate::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(TEMPLATE_FILE) && e.contains("chat template:"), "{e}");
        // A folder where the template file should be is refused, not read.
        std::fs::remove_file(tmp.path().join(TEMPLATE_FILE)).unwrap();
        std::fs::create_dir(tmp.path().join(TEMPLATE_FILE)).unwrap();
        let e = ChatTemplate::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        std::fs::remove_dir(tmp.path().join(TEMPLATE_FILE)).unwrap();
        std::fs::write(tmp.path().join(TOKENIZER_CONFIG), "{not json").unwrap();
        let e = ChatTemplate::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(TOKENIZER_CONFIG) && e.contains("not valid JSON"), "{e}");
        write_config(tmp.path(), serde_json::json!({"chat_template": 7}));
        assert!(ChatTemplate::load(tmp.path()).is_err());
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let src = "{{ messages | tojson }}|{{ messages[0] | tojson(ensure_ascii=True) }}|{{ [1, {'a': 'x'}] | tojson(indent=2) }}";
        let t = ChatTemplate::from_source(src, "x.jinja", None, None).unwrap();
        let out = t.render(&[Message::new("user", "<a> & 'é'")], false).unwrap();
        // What Python's json.dumps writes (ensure_ascii=False unless asked; no HTML escaping).
        let want = [
            r#"[{"role": "user", "content": "<a> & 'é'"}]"#,
            r#"{"role": "user", "content": "<a> & '\u00e9'"}"#,
            "[\n  1,\n  {\n    \"a\": \"x\"\n  }\n]",
        ];
        assert_eq!(out, want.join("|"));
        let bad = ChatTemplate::from_source("{{ 1 | tojson(nope=1) }}", "x.jinja", None, None).unwrap();
        assert!(bad.render(&[], false).is_err());
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %% %q", 1_709_211_909), {
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 % %q"
        });
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        let t = ChatTemplate::from_source("{{ strftime_now('%Y') }}", "x.jinja", None, None).unwrap();
        assert!(t.render(&[], false).unwrap().parse::<i64>().unwrap() >= 2024);
    }
}
