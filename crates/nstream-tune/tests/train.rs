//! Whole runs on the committed tiny checkpoint: the output folder, the loss falling, the data
//! rules, bad input, and resumption ending bit for bit where an uninterrupted run ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use nstream_tune::train::Stop;
use nstream_tune::{BaseModel, Error, Method, Precision, ProgressMode, Settings, finetune};

fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llm/tiny-llama").join(variant)
}

fn base() -> BaseModel {
    BaseModel::from_safetensors_dir(&fixture("f32"), &Device::Cpu, DType::F32).expect("base")
}

/// A small chat dataset in the format `nstream generate` writes, plus prompt/completion records.
fn write_data(folder: &Path) -> PathBuf {
    let mut lines = Vec::new();
    for index in 0..12 {
        let question = format!("What is {index} plus {index}?");
        let answer = format!("It is {}.", index * 2);
        if index % 3 == 0 {
            lines.push(serde_json::json!({"prompt": question, "completion": answer}).to_string());
        } else {
            lines.push(
                serde_json::json!({"messages": [
                    {"role": "system", "content": "You add numbers."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]})
                .to_string(),
            );
        }
    }
    let path = folder.join("train.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn settings(data: &Path, output: &Path) -> Settings {
    let mut settings = Settings::new(data, output);
    settings.max_steps = Some(6);
    settings.batch_size = 2;
    settings.gradient_accumulation = 2;
    settings.learning_rate = 5e-3;
    settings.warmup = 1;
    settings.validation_split = 0.25;
    settings.target_modules = vec!["all-linear".into()];
    settings.progress = ProgressMode::Quiet;
    settings.dropout = 0.1;
    settings
}

#[test]
fn a_lora_run_writes_a_peft_adapter_and_its_reports() {
    let folder = tempfile::tempdir().unwrap();
    let data = write_data(folder.path());
    let output = folder.path().join("out");
    let mut run = settings(&data, &output);
    run.merge = true;
    let summary = finetune(base(), &run, false, &AtomicBool::new(false)).expect("run");
    assert_eq!(summary.stop, Stop::Complete);
    assert_eq!(summary.steps, 6);
    assert!(summary.validation_examples > 0 && summary.train_examples > 0);
    assert_eq!(summary.validation_examples + summary.train_examples, 12);
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.json",
        "metrics.jsonl",
        "report.md",
        "loss_curve.svg",
        "base_model.json",
        "merged/model.safetensors",
        "merged/config.json",
        "merged/tokenizer.json",
    ] {
        assert!(output.join(file).is_file(), "{file} is missing");
    }
    assert!(!output.join("checkpoint.safetensors").exists(), "the checkpoint of a finished run is removed");
    let adapter = nstream_peft::Adapter::read(&output).expect("adapter");
    assert_eq!(adapter.config.r, 8);
    assert_eq!(adapter.pairs.len(), 2 * 7);
    let (tensors, _) = nstream_peft::tensors::read(&output.join("adapter_model.safetensors")).unwrap();
    assert!(tensors.contains_key("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"));
    assert!(tensors.contains_key("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"));
    // B moved off zero: training happened.
    assert!(adapter.pairs.values().all(|pair| pair.b.data.iter().any(|&value| value != 0.0)));
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(metrics.len(), 7, "step 0 (validation only) and 6 steps");
    assert!(metrics[0]["validation_loss"].is_f64() && metrics[0].get("loss").is_none());
    for entry in &metrics[1..] {
        for key in ["step", "loss", "learning_rate", "tokens_per_second"] {
            assert!(entry.get(key).is_some(), "{key} missing in {entry}");
        }
    }
    assert!(metrics[6]["validation_loss"].is_f64());
    assert_eq!(metrics[1]["learning_rate"], 0.0, "warmup starts at 0 as transformers' schedule");
    let svg = std::fs::read_to_string(output.join("loss_curve.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("validation"));
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("training_args.json")).unwrap()).unwrap();
    assert_eq!(args["rank"], 8);
    // A second run into the same folder is refused, leaving it as it was.
    let error = finetune(base(), &run, false, &AtomicBool::new(false)).unwrap_err().to_string();
    assert!(error.contains("holds another run") && error.contains("--resume"), "{error}");
}

#[test]
fn training_lowers_the_loss_on_the_training_data() {
    let folder = tempfile::tempdir().unwrap();
    let data = write_data(folder.path());
    let mut run = settings(&data, &folder.path().join("out"));
    run.validation_split = 0.0;
    run.validation = Some(data.clone());
    run.max_steps = Some(30);
    run.learning_rate = 1e-2;
    run.dropout = 0.0;
    run.method = Method::Full;
    run.learning_rate = 2e-3;
    let summary = finetune(base(), &run, false, &AtomicBool::new(false)).expect("run");
    let (first, last) = (summary.first_validation_loss.unwrap(), summary.final_validation_loss.unwrap());
    assert!(last < first * 0.7, "validation loss {first} -> {last}");
    assert!(folder.path().join("out/model.safetensors").is_file());
    assert!(folder.path().join("out/config.json").is_file());
}

#[test]
fn bf16_trains_through_the_differentiable_path_with_an_f32_master_copy() {
    // bf16 on the CPU runs the forward CUDA runs (candle's differentiable operations, not the
    // fused f32 kernels), so this is the GPU's training path, tested without a GPU.
    let folder = tempfile::tempdir().unwrap();
    let data = write_data(folder.path());
    let output = folder.path().join("out");
    let mut run = settings(&data, &output);
    run.precision = Precision::Bf16;
    run.validation_split = 0.0;
    run.validation = Some(data.clone());
    run.max_steps = Some(30);
    run.learning_rate = 1e-2;
    run.dropout = 0.0;
    let summary = finetune(base(), &run, false, &AtomicBool::new(false)).expect("run");
    let (first, last) = (summary.first_validation_loss.unwrap(), summary.final_validation_loss.unwrap());
    assert!(last < first * 0.8, "validation loss {first} -> {last}");
    let adapter = nstream_peft::Adapter::read(&output).expect("adapter");
    assert_eq!(adapter.pairs.len(), 2 * 7);
    // Every adapted module learned (a module without a gradient keeps B at zero).
    assert!(adapter.pairs.values().all(|pair| pair.b.data.iter().any(|&value| value != 0.0)));
    // Written from the f32 master copy: values a bf16 tensor cannot hold (low 16 bits set).
    let off_grid = adapter
        .pairs
        .values()
        .flat_map(|pair| pair.a.data.iter().chain(&pair.b.data))
        .filter(|value| value.to_bits() & 0xffff != 0)
        .count();
    assert!(off_grid > 0, "every written value is a bf16 value: the master copy was lost");
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("training_args.json")).unwrap()).unwrap();
    assert_eq!(args["precision"], "bf16");
}

fn adapter_bytes(output: &Path) -> Vec<u8> {
    std::fs::read(output.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn an_interrupted_and_resumed_run_ends_bit_for_bit_as_an_uninterrupted_one() {
    let folder = tempfile::tempdir().unwrap();
    let data = write_data(folder.path());
    let straight = folder.path().join("straight");
    let run = settings(&data, &straight);
    finetune(base(), &run, false, &AtomicBool::new(false)).expect("uninterrupted");

    let resumed = folder.path().join("resumed");
    let mut run = settings(&data, &resumed);
    run.save_every = 4;
    // A stop request after the first step, then after the next, then the rest (crossing the
    // epoch boundary and a --save-every checkpoint).
    let summary = finetune(base(), &run, false, &AtomicBool::new(true)).expect("first part");
    assert_eq!((summary.stop, summary.steps), (Stop::Interrupted, 1));
    assert!(resumed.join("checkpoint.safetensors").is_file());
    let summary = finetune(base(), &run, true, &AtomicBool::new(true)).expect("second part");
    assert_eq!((summary.stop, summary.steps, summary.resumed_from), (Stop::Interrupted, 2, 1));
    let summary = finetune(base(), &run, true, &AtomicBool::new(false)).expect("rest");
    assert_eq!((summary.stop, summary.steps), (Stop::Complete, 6));
    assert!(adapter_bytes(&straight) == adapter_bytes(&resumed), "the adapters differ");
    let losses = |output: &Path| -> Vec<String> {
        std::fs::read_to_string(output.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                format!("{} {} {}", value["step"], value["loss"], value["validation_loss"])
            })
            .collect()
    };
    assert_eq!(losses(&straight), losses(&resumed));

    // Resuming with other settings is refused.
    let other = folder.path().join("other");
    let mut run = settings(&data, &other);
    finetune(base(), &run, false, &AtomicBool::new(true)).unwrap();
    run.learning_rate = 1e-3;
    let error = finetune(base(), &run, true, &AtomicBool::new(false)).unwrap_err().to_string();
    assert!(error.contains("other settings"), "{error}");
}

fn expect_error(run: &Settings, expected: &str) {
    let error = finetune(base(), run, false, &AtomicBool::new(false)).expect_err(expected);
    let text = error.to_string();
    assert!(text.contains(expected), "expected {expected:?} in: {text}");
    assert!(!run.output.exists(), "{}: nothing may be written on bad input ({text})", run.output.display());
}

#[test]
fn bad_input_is_refused_clearly_and_nothing_is_written() {
    let folder = tempfile::tempdir().unwrap();
    let data = write_data(folder.path());
    let output = folder.path().join("out");
    let write = |name: &str, text: &str| {
        let path = folder.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };

    let mut run = settings(&data, &output);
    run.learning_rate = 0.0;
    expect_error(&run, "invalid setting `learning-rate`");

    let mut run = settings(&data, &output);
    run.target_modules = vec!["q_proj".into(), "qkv".into()];
    expect_error(&run, "unknown target module `qkv`");

    let run = settings(&write("empty.jsonl", "\n\n"), &output);
    expect_error(&run, "empty.jsonl: the file holds no record");

    let run = settings(&write("malformed.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{not json\n"), &output);
    expect_error(&run, "malformed.jsonl:2: not a JSON object");

    let run = settings(&write("shape.jsonl", "{\"text\": \"a\"}\n"), &output);
    expect_error(&run, "shape.jsonl:1: expected {\"messages\"");

    let no_answer =
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n";
    let run = settings(&write("no-answer.jsonl", no_answer), &output);
    expect_error(&run, "no-answer.jsonl:2: no assistant turn");

    let mut run = settings(&data, &output);
    run.max_seq_len = 8;
    run.no_truncate = true;
    expect_error(&run, "over --max-seq-len 8");

    let mut run = settings(&data, &output);
    run.memory_limit_mib = Some(1);
    expect_error(&run, "MiB are available");

    let mut run = settings(&data, &output);
    run.method = Method::Full;
    run.merge = true;
    expect_error(&run, "invalid setting `merge`");

    // A model that is not a causal LM.
    let bert = folder.path().join("bert");
    std::fs::create_dir_all(&bert).unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("f32").join(file), bert.join(file)).unwrap();
    }
    std::fs::write(bert.join("config.json"), r#"{"model_type": "bert", "hidden_size": 64}"#).unwrap();
    let error = BaseModel::from_safetensors_dir(&bert, &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(error, Error::Model(_)));
    assert!(error.to_string().contains("model_type \"bert\""), "{error}");
}

#[test]
fn truncation_is_counted_and_the_split_is_stable_and_disjoint() {
    let folder = tempfile::tempdir().unwrap();
    let data = write_data(folder.path());
    let base = base();
    let options = |split: f64, max_seq_len: usize| {
        let mut options = nstream_tune::data::DataOptions::default();
        options.validation_split = split;
        options.max_seq_len = max_seq_len;
        options
    };
    let load =
        |options| nstream_tune::data::load_dataset(&data, None, &options, &base.template, &base.tokenizer).unwrap();
    let first = load(options(0.3, 1024));
    let second = load(options(0.3, 1024));
    assert_eq!(first.train, second.train);
    assert_eq!(first.validation, second.validation);
    assert!(!first.validation.is_empty() && !first.train.is_empty());
    assert!(first.validation.iter().all(|example| !first.train.iter().any(|train| train.location == example.location)));
    assert_eq!(first.truncated, 0);
    // Cut one token short of the longest record: those that long are cut (and counted) but keep
    // most of their answer.
    let full = load(options(0.0, 1024));
    let longest = full.train.iter().map(|example| example.tokens.len()).max().unwrap();
    let short = load(options(0.0, longest - 1));
    assert!(short.truncated > 0 && short.truncated < full.train.len(), "{} cut", short.truncated);
    assert_eq!(short.train.len() + short.dropped, full.train.len());
    assert!(short.train.iter().all(|example| example.tokens.len() < longest));
}

#[test]
fn only_assistant_tokens_are_targets() {
    let base = base();
    let messages = vec![
        nstream_backend::chat::ChatMessage::new(nstream_backend::chat::Role::System, "Be brief."),
        nstream_backend::chat::ChatMessage::new(nstream_backend::chat::Role::User, "Hi there"),
        nstream_backend::chat::ChatMessage::new(nstream_backend::chat::Role::Assistant, "Hello!"),
        nstream_backend::chat::ChatMessage::new(nstream_backend::chat::Role::User, "Bye"),
        nstream_backend::chat::ChatMessage::new(nstream_backend::chat::Role::Assistant, "Goodbye."),
    ];
    let (tokens, mask) =
        nstream_tune::data::tokenize_messages(&messages, &base.template, &base.tokenizer, "test:1").unwrap();
    // The whole sequence is exactly the template's rendering.
    let rendered = base.template.render(&messages, false, None).unwrap();
    assert_eq!(base.tokenizer.decode(&tokens, false).unwrap(), rendered);
    // The targets are the two answers with their end-of-turn markers, nothing else.
    let mut spans = Vec::new();
    let mut current = Vec::new();
    for (&token, &target) in tokens.iter().zip(&mask) {
        if target {
            current.push(token);
        } else if !current.is_empty() {
            spans.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        spans.push(current);
    }
    let texts: Vec<String> = spans.iter().map(|span| base.tokenizer.decode(span, false).unwrap()).collect();
    assert_eq!(texts, vec!["Hello!<|im_end|>\n".to_owned(), "Goodbye.<|im_end|>\n".to_owned()]);
}
