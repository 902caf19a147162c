//! Chat templates: the Jinja template a GGUF file carries (`tokenizer.chat_template`),
//! rendered with `minijinja` and Python-compatible string methods, as Hugging Face does.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Longest template accepted (bytes).
const MAX_TEMPLATE: usize = 1 << 20;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Render `template` for `messages`.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    if template.len() > MAX_TEMPLATE {
        return Err(EngineError::Model(format!(
            "the chat template is {} bytes, more than the {MAX_TEMPLATE} accepted",
            template.len()
        )));
    }
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.set_fuel(Some(10_000_000));
    let tmpl = env.template_from_str(template).map_err(|e| {
        EngineError::Model(format!("the model's chat template does not parse: {e}"))
    })?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| EngineError::input(format!("the chat template refused the conversation: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_a_chatml_template() {
        let out = render(CHATML, &[ChatMessage::new("user", " Hi ")], true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = "{{ messages[0].content.strip().upper() }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}";
        assert_eq!(
            render(t, &[ChatMessage::new("user", " a ")], false, "", "").unwrap(),
            "A"
        );
        let two = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        let e = render(t, &two, false, "", "").unwrap_err().to_string();
        assert!(e.contains("one message only"), "{e}");
        assert!(render("{% for x in", &two, false, "", "").is_err());
    }
}
