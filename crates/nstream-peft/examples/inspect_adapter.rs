//! Reading a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) from
//! another program, with no tensor library.
//!
//! Given a folder (one `nstream finetune` or Python `peft` saved), prints its configuration, the
//! scale it applies and the shape of every `(layer, module)` pair. Without one, it first writes a
//! small rank-2 adapter on q_proj/v_proj of two layers into a temporary folder with
//! [`Adapter::write`] and reads that back, so the round trip through the real files is shown too.
//!
//! `cargo run -p nstream-peft --example inspect_adapter -- [ADAPTER_FOLDER]`

use std::collections::BTreeMap;
use std::path::PathBuf;

use nstream_peft::{Adapter, LoraConfig, LoraPair, Module, Tensor};

/// Hidden size of the made-up base model the written adapter targets.
const HIDDEN: usize = 8;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scratch = tempfile::tempdir()?;
    let folder = match std::env::args_os().nth(1) {
        Some(folder) => PathBuf::from(folder),
        None => {
            let rank = 2;
            let config = LoraConfig::new(rank, 16.0, &[Module::QProj, Module::VProj]);
            let mut pairs = BTreeMap::new();
            for layer in 0..2 {
                for module in [Module::QProj, Module::VProj] {
                    // Deterministic non-zero values; real ones come from training.
                    let values = |count: usize| (0..count).map(|index| (index % 7) as f32 * 0.01).collect();
                    let a = Tensor::new(vec![rank, HIDDEN], values(rank * HIDDEN));
                    let b = Tensor::new(vec![HIDDEN, rank], values(HIDDEN * rank));
                    pairs.insert((layer, module), LoraPair { a, b });
                }
            }
            Adapter { config, pairs }.write(scratch.path())?;
            println!("wrote an adapter to {}", scratch.path().display());
            scratch.path().to_path_buf()
        }
    };

    let adapter = Adapter::read(&folder)?;
    let config = &adapter.config;
    println!(
        "{}: r={} lora_alpha={} scale={} rslora={} targets={}",
        config.peft_type,
        config.r,
        config.lora_alpha,
        config.scale(),
        config.use_rslora,
        config.target_modules.join(",")
    );
    println!("base: {}", config.base_model_name_or_path.as_deref().unwrap_or("(not recorded)"));
    for ((layer, module), pair) in &adapter.pairs {
        println!("layer {layer} {}: A {:?} B {:?}", module.name(), pair.a.shape, pair.b.shape);
    }
    Ok(())
}
