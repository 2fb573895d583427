//! `zmoe generate --chat / --system / --prompt - / --prompt-file` on the synthetic models of
//! every family, whose folders carry the family's released chat template (`zmoe synth`).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::s;
use zmoe::chat::{ChatTemplate, Message};
use zmoe::checkpoint::synth::{SynthQuant, family_chat};

/// The tiny preset of every family.
const PRESETS: [&str; 5] = [
    "qwen3_moe/tiny",
    "glm4_moe_lite/glm-tiny",
    "deepseek_v3/deepseek-tiny",
    "lfm2_moe/lfm2-tiny",
    "gpt_oss/gpt-oss-tiny",
];

/// A seed that differs between runs, so no test passes on one lucky model or prompt.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

/// A random lowercase word.
fn word(seed: &mut u64) -> String {
    (0..6)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            char::from(b'a' + ((*seed >> 33) % 26) as u8)
        })
        .collect()
}

/// Runs zmoe with `stdin` as its standard input.
fn zmoe_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zmoe"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run zmoe");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// The JSON line `generate --json` printed.
fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "zmoe failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key].as_array().unwrap_or_else(|| panic!("no {key} in {v}")).iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// What `text` tokenizes to with the model's tokenizer.
fn encode(model: &Path, text: &str) -> Vec<u32> {
    let tok = zmoe::tokenizer::load(&model.join("tokenizer.json")).unwrap();
    zmoe::tokenizer::encode(&tok, text).unwrap()
}

#[test]
fn chat_generates_on_every_family_with_its_special_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seed = fresh_seed();
    for preset in PRESETS {
        let family = preset.split('/').next().unwrap();
        let model = common::synth_preset(tmp.path(), family, preset, SynthQuant::Affine4, seed % 1000);
        let (system, user) = (format!("Be {}.", word(&mut seed)), word(&mut seed));
        let args = ["generate", "--model", s(&model), "--backend", "cpu", "--chat", "--system", &system];
        let rest = ["--prompt", &user, "--max-tokens", "4", "--json"];
        let v = json_of(&common::zmoe(&[&args[..], &rest[..]].concat()));
        let generated = ids(&v, "tokens");
        assert!(generated.len() == 4 || v["finish_reason"] == "stop", "{preset}: {v}");

        // The prompt is the template's rendering of [system, user] + the assistant's opening,
        // tokenized without added special tokens.
        let template = ChatTemplate::load(&model).unwrap();
        let messages = [Message::new("system", &system), Message::new("user", &user)];
        let text = template.render(&messages, true).unwrap();
        assert!(text.contains(&system) && text.contains(&user), "{preset}: {text}");
        let prompt = ids(&v, "prompt_tokens");
        assert_eq!(prompt, encode(&model, &text), "{preset}: {text}");

        // ... and holds the family's chat special tokens as single ids (the synthetic tokenizer
        // has them), with the BOS token once at most.
        let chat = family_chat(family).unwrap();
        let tok = zmoe::tokenizer::load(&model.join("tokenizer.json")).unwrap();
        let want: &[&str] = match family {
            "qwen3_moe" => &["<|im_start|>", "<|im_end|>"],
            "glm4_moe_lite" => &["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<think>"],
            "lfm2_moe" => &["<|startoftext|>", "<|im_start|>", "<|im_end|>"],
            "gpt_oss" => &["<|start|>", "<|message|>", "<|end|>"],
            _ => &["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "</think>"],
        };
        for name in want {
            let id = tok.token_to_id(name).unwrap_or_else(|| panic!("{preset}: no token {name}"));
            assert_eq!(Some(id as usize), chat.id(1024, name), "{preset}: {name}");
            assert!(prompt.contains(&id), "{preset}: {name} ({id}) not in {prompt:?}");
        }
        if let Some(bos) = chat.bos {
            let id = tok.token_to_id(bos).unwrap();
            assert_eq!(prompt.iter().filter(|&&t| t == id).count(), 1, "{preset}: {prompt:?}");
            assert_eq!(prompt[0], id, "{preset}: BOS first");
        }
        // Without --chat the same text is a plain prompt: no template tokens.
        let plain = json_of(&common::zmoe(&[
            "generate",
            "--model",
            s(&model),
            "--backend",
            "cpu",
            "--prompt",
            &user,
            "--max-tokens",
            "1",
            "--json",
        ]));
        assert_eq!(ids(&plain, "prompt_tokens"), encode(&model, &user), "{preset}");
    }
}

#[test]
fn family_templates_render_as_transformers_does() {
    // Expected texts rendered by Python Jinja2 with transformers' settings (trim_blocks,
    // lstrip_blocks) from the same templates: a system message, a user message with spaces
    // around it, an earlier assistant turn with reasoning, and the generation prompt.
    let tmp = tempfile::tempdir().unwrap();
    let msgs = [
        Message::new("system", "S"),
        Message::new("user", "q1"),
        Message::new("assistant", "<think>\nreason\n</think>\n\nanswer"),
        Message::new("user", " U x "),
    ];
    // gpt-oss's harmony header carries today's date (strftime_now, UTC).
    let harmony = |date: String| {
        format!(
            "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n\
             Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: medium\n\n\
             # Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>\
             <|start|>developer<|message|># Instructions\n\nS\n\n<|end|><|start|>user<|message|>q1<|end|>\
             <|start|>assistant<|channel|>final<|message|>answer<|end|><|start|>user<|message|> U x <|end|>\
             <|start|>assistant"
        )
    };
    let today = || {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let (y, m, d) = zmoe::date::civil_date(secs.div_euclid(86_400));
        format!("{y:04}-{m:02}-{d:02}")
    };
    let want = [
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>\n\
         <|im_start|>user\n U x <|im_end|>\n<|im_start|>assistant\n",
        "[gMASK]<sop><|system|>S<|user|>q1<|assistant|></think>answer<|user|> U x <|assistant|><think>",
        "<｜begin▁of▁sentence｜>S<｜User｜>q1<｜Assistant｜></think>\n\nanswer<｜end▁of▁sentence｜><｜User｜> U x \
         <｜Assistant｜></think>",
        "<|startoftext|><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n\
         <think>\nreason\n</think>\n\nanswer<|im_end|>\n<|im_start|>user\n U x <|im_end|>\n<|im_start|>assistant\n",
    ];
    // The three fixed texts, then gpt-oss's (dated) one.
    for (preset, want) in PRESETS.iter().zip(want.into_iter().map(Some).chain([None])) {
        let family = preset.split('/').next().unwrap();
        let model = common::synth_preset(tmp.path(), family, preset, SynthQuant::Affine8, fresh_seed() % 1000);
        let t = ChatTemplate::load(&model).unwrap();
        let before = today();
        let got = t.render(&msgs, true).unwrap();
        match want {
            Some(want) => assert_eq!(got, want, "{preset}"),
            // Either side of a midnight that falls during the render.
            None => assert!(got == harmony(before) || got == harmony(today()), "{preset}: {got:?}"),
        }
        // synth writes it into tokenizer_config.json, with the family's EOS token.
        assert!(t.origin().ends_with("tokenizer_config.json"));
        assert_eq!(t.eos_token(), Some(family_chat(family).unwrap().eos));
    }
}

#[test]
fn prompt_from_stdin_and_from_a_file() {
    let model = common::shared_tiny(SynthQuant::Affine4, 3);
    let mut seed = fresh_seed();
    let text = format!("{} {}\n{}", word(&mut seed), word(&mut seed), word(&mut seed));
    let base = ["generate", "--model", s(model), "--backend", "cpu", "--max-tokens", "2", "--json"];
    let v = json_of(&zmoe_stdin(&[&base[..], &["--prompt", "-"]].concat(), &text));
    assert_eq!(ids(&v, "prompt_tokens"), encode(model, &text));

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompt.txt");
    std::fs::write(&file, &text).unwrap();
    let v = json_of(&common::zmoe(&[&base[..], &["--prompt-file", s(&file)]].concat()));
    assert_eq!(ids(&v, "prompt_tokens"), encode(model, &text));

    // Both work with --chat: the text becomes the user message.
    let chat = ChatTemplate::load(model).unwrap().render(&[Message::new("user", &text)], true).unwrap();
    let v = json_of(&zmoe_stdin(&[&base[..], &["--chat", "--prompt", "-"]].concat(), &text));
    assert_eq!(ids(&v, "prompt_tokens"), encode(model, &chat));
    let v = json_of(&common::zmoe(&[&base[..], &["--chat", "--prompt-file", s(&file)]].concat()));
    assert_eq!(ids(&v, "prompt_tokens"), encode(model, &chat));

    // A missing file and a folder are clear errors naming the path.
    let missing = tmp.path().join("missing.txt");
    let e = common::zmoe_err(&[&base[..], &["--prompt-file", s(&missing)]].concat());
    assert!(e.contains("--prompt-file") && e.contains("missing.txt"), "{e}");
    let e = common::zmoe_err(&[&base[..], &["--prompt-file", s(tmp.path())]].concat());
    assert!(e.contains("is a folder, not a regular file"), "{e}");
    // --prompt and --prompt-file together: a usage error.
    let out = common::zmoe(&[&base[..], &["--prompt", "x", "--prompt-file", s(&file)]].concat());
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn system_needs_chat_and_chat_needs_a_template() {
    let model = common::shared_tiny(SynthQuant::Affine4, 3);
    let base = ["generate", "--model", s(model), "--backend", "cpu", "--max-tokens", "2"];
    let out = common::zmoe(&[&base[..], &["--system", "be brief", "--prompt", "hi"]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--chat"), "{err}");
    // --chat with --prompt-tokens: a usage error (token ids are not a message).
    let out = common::zmoe(&[&base[..], &["--chat", "--prompt-tokens", "1,2"]].concat());
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // --prompt-tokens still works.
    let v = json_of(&common::zmoe(&[&base[..], &["--prompt-tokens", "5,6,7", "--json"]].concat()));
    assert_eq!(ids(&v, "prompt_tokens"), vec![5, 6, 7]);

    // A folder without a template: a clear error for --chat, before the weights are read.
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("bare");
    common::copy_model(model, &bare);
    std::fs::remove_file(bare.join("tokenizer_config.json")).unwrap();
    let args = ["generate", "--model", s(&bare), "--backend", "cpu", "--chat", "--prompt", "hi"];
    let e = common::zmoe_err(&args);
    assert!(e.contains("--chat") && e.contains("no chat template") && e.contains("bare"), "{e}");
    // A broken chat_template.jinja: an error naming it.
    std::fs::write(bare.join("chat_template.jinja"), "{% if messages %}never closed").unwrap();
    let e = common::zmoe_err(&args);
    assert!(e.contains("chat_template.jinja") && e.contains("chat template:"), "{e}");
    // A template that raises: its message, naming the file.
    std::fs::write(bare.join("chat_template.jinja"), "{{ raise_exception('roles must alternate') }}").unwrap();
    let e = common::zmoe_err(&args);
    assert!(e.contains("chat_template.jinja") && e.contains("roles must alternate"), "{e}");
    // Without --chat the folder still generates from plain text.
    let out =
        common::zmoe(&["generate", "--model", s(&bare), "--backend", "cpu", "--prompt", "hi", "--max-tokens", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
