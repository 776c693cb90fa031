//! `nstream chat`: talk to a chat model from the terminal, interactively or once for scripts.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, Role};
use nstream_backend::{ChatCompletionRequest, ModelBackend, StreamOptions};
use nstream_core::ModelResource;
use nstream_providers::{LoadOptions, SecretLookup, load_model};
use rustyline::error::ReadlineError;

/// Arguments of `nstream chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A YAML file holding the chat model (a BaseModel or a MegaModel).
    #[arg(short, long, value_name = "FILE")]
    pub model: String,
    /// Which model of the file, when it holds several.
    #[arg(long)]
    pub name: Option<String>,
    /// A system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Ask one question, print the answer and exit (for scripts); without it, chat interactively.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Sampling temperature.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Most tokens per answer.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Sampling seed, for reproducible answers.
    #[arg(long)]
    pub seed: Option<i64>,
    /// CPU threads for a BaseModel (defaults to the cores available).
    #[arg(long, env = "NSTREAM_THREADS")]
    pub threads: Option<usize>,
}

/// Streams one answer to stdout and returns its text.
async fn answer(backend: &dyn ModelBackend, request: ChatCompletionRequest) -> anyhow::Result<String> {
    // Backends take requests as valid (ModelBackend's contract): the caller checks them.
    request.validate()?;
    let mut stream = backend.chat_stream(request).await?;
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        for choice in &chunk.choices {
            if let Some(content) = &choice.delta.content {
                text.push_str(content);
                write!(stdout, "{content}")?;
                stdout.flush()?;
            }
        }
        if let Some(usage) = chunk.usage {
            tracing::debug!(prompt = usage.prompt_tokens, completion = usage.completion_tokens, "usage");
        }
    }
    writeln!(stdout)?;
    Ok(text)
}

/// Loads the model and chats.
pub fn run(args: &ChatArgs) -> anyhow::Result<ExitCode> {
    let resource = super::model_file::pick(&args.model, args.name.as_deref(), "chat model", |resource| {
        matches!(resource, ModelResource::MegaModel(_) | ModelResource::BaseModel(_))
    })?;
    let mut options = LoadOptions::default();
    options.llm.threads = args.threads;
    let model = load_model(&resource, &options, &SecretLookup::from_env(), None)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new(Role::System, system.clone()));
    }
    let request = |messages: &Vec<ChatMessage>| {
        let mut request = ChatCompletionRequest::new(&model.name, messages.clone());
        request.stream = true;
        request.stream_options = Some(StreamOptions { include_usage: true });
        request.temperature = args.temperature;
        request.max_tokens = args.max_tokens;
        request.seed = args.seed;
        request
    };
    if let Some(prompt) = &args.prompt {
        messages.push(ChatMessage::new(Role::User, prompt.clone()));
        runtime.block_on(answer(model.backend.as_ref(), request(&messages)))?;
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("chatting with {} (empty line or Ctrl-D to quit)", model.name);
    let mut turn = |line: &str| {
        messages.push(ChatMessage::new(Role::User, line.to_string()));
        match runtime.block_on(answer(model.backend.as_ref(), request(&messages))) {
            Ok(text) => messages.push(ChatMessage::new(Role::Assistant, text)),
            Err(error) => {
                eprintln!("error: {error:#}");
                messages.pop();
            }
        }
    };
    if std::io::stdin().is_terminal() {
        chat_in_terminal(&mut turn)?;
    } else {
        // Piped input (scripts, tests): one question per line, no line editing.
        let stdin = std::io::stdin();
        loop {
            eprint!("> ");
            let mut line = String::new();
            if stdin.lock().read_line(&mut line).context("cannot read standard input")? == 0 || line.trim().is_empty() {
                break;
            }
            turn(line.trim_end());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the questions of earlier chats are kept, for the up arrow and Ctrl-R.
fn history_file() -> PathBuf {
    nstream_providers::default_data_dir().join("chat_history")
}

/// The interactive loop on a terminal: line editing, and the history of earlier chats.
fn chat_in_terminal(turn: &mut impl FnMut(&str)) -> anyhow::Result<()> {
    let mut editor = rustyline::DefaultEditor::new().context("cannot set up line editing on this terminal")?;
    let history = history_file();
    // A first chat has no history yet; any other problem only costs the history.
    if let Err(error) = editor.load_history(&history)
        && history.exists()
    {
        eprintln!("warning: cannot read the chat history {}: {error}", history.display());
    }
    loop {
        match editor.readline("> ") {
            Ok(line) if line.trim().is_empty() => break,
            Ok(line) => {
                let _ = editor.add_history_entry(line.as_str());
                turn(line.trim_end());
            }
            // Ctrl-C drops the line being typed, as shells do; Ctrl-D quits.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(error) => return Err(error).context("cannot read the terminal"),
        }
    }
    if let Some(folder) = history.parent() {
        let _ = std::fs::create_dir_all(folder);
    }
    if let Err(error) = editor.save_history(&history) {
        eprintln!("warning: cannot save the chat history to {}: {error}", history.display());
    }
    Ok(())
}
