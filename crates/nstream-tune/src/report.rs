//! `report.md`: what was trained, on what, and how it went.

use std::fmt::Write;

use crate::base::Provenance;
use crate::settings::{Method, Settings};
use crate::train::{MemoryEstimate, Summary};

fn loss(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.4}"))
}

/// The report of a finished run.
pub fn report(settings: &Settings, summary: &Summary, provenance: &Provenance, estimate: &MemoryEstimate) -> String {
    let mut text = String::new();
    let method = match settings.method {
        Method::Lora => format!(
            "LoRA r={} alpha={} dropout={}{} on {}",
            settings.rank,
            settings.alpha,
            settings.dropout,
            if settings.rslora { " (rsLoRA)" } else { "" },
            settings.target_modules.join(", ")
        ),
        Method::Full => "full fine-tuning".to_owned(),
    };
    let _ = writeln!(text, "# Fine-tuning report\n");
    let _ = writeln!(
        text,
        "- base: {} (revision {}, {} {})",
        provenance.repo_id.as_deref().unwrap_or("local"),
        provenance.revision.as_deref().unwrap_or("main"),
        provenance.format,
        provenance.files.join(", ")
    );
    let _ = writeln!(text, "- method: {method}");
    let _ = writeln!(
        text,
        "- parameters: {} trainable of {} ({:.3}%)",
        summary.trainable_parameters,
        summary.parameters,
        100.0 * summary.trainable_parameters as f64 / summary.parameters.max(1) as f64
    );
    let _ = writeln!(
        text,
        "- data: {} training and {} validation examples from {}; {} cut at {} tokens, {} dropped (no target left)",
        summary.train_examples,
        summary.validation_examples,
        settings.data.display(),
        summary.truncated,
        settings.max_seq_len,
        summary.dropped
    );
    let _ = writeln!(
        text,
        "- steps: {} (batch {} x accumulation {}, learning rate {} with {} warmup steps, cosine decay, seed {})",
        summary.steps,
        settings.batch_size,
        settings.gradient_accumulation,
        settings.learning_rate,
        settings.warmup,
        settings.seed
    );
    let _ = writeln!(
        text,
        "- loss: final training {}; validation {} -> {}",
        loss(summary.final_loss),
        loss(summary.first_validation_loss),
        loss(summary.final_validation_loss)
    );
    let _ = writeln!(
        text,
        "- time: {:.1} s{}, {:.0} training tokens/s",
        summary.elapsed_seconds,
        if summary.resumed_from > 0 {
            format!(" (this run, resumed at step {})", summary.resumed_from)
        } else {
            String::new()
        },
        summary.tokens_per_second
    );
    let _ = writeln!(
        text,
        "- memory estimate: {} MiB (weights {}, optimiser {}, activations {})",
        estimate.total() >> 20,
        estimate.weights >> 20,
        estimate.optimizer >> 20,
        estimate.activations >> 20
    );
    let _ = writeln!(
        text,
        "\nFiles: adapter_config.json + adapter_model.safetensors (LoRA) or model.safetensors (full), training_args.json, metrics.jsonl, loss_curve.svg, base_model.json."
    );
    text
}
