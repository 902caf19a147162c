//! Text classification with fastText-family models: each text's top labels with
//! fastText's probabilities, computed one text at a time (bits independent of the batch).

use std::sync::Arc;
use std::time::Instant;

use super::Timings;
use super::image::Class;
use crate::error::{EngineError, Result};
use crate::fasttext::FastText;

/// A text-classification pipeline.
pub struct TextClassification {
    model: Arc<FastText>,
    top_k: usize,
    threshold: f32,
}

impl TextClassification {
    pub(crate) fn new(model: Arc<FastText>) -> TextClassification {
        TextClassification {
            model,
            top_k: 5,
            threshold: 0.0,
        }
    }

    /// Return the `k` best labels per text (default 5).
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k.max(1);
        self
    }

    /// Return only labels whose probability is at least `threshold` (default 0).
    pub fn with_threshold(mut self, threshold: f32) -> Self {
        self.threshold = threshold;
        self
    }

    /// The label names, in the model's order.
    pub fn labels(&self) -> &[String] {
        self.model.labels()
    }

    /// The best labels of each text, best first.
    pub fn classify(&self, texts: &[&str]) -> Result<(Vec<Vec<Class>>, Timings)> {
        self.classify_from(texts, 0)
    }

    /// [`classify`](Self::classify) for texts that are part of a larger request whose first
    /// text here is number `first` (errors name the request's numbering).
    pub fn classify_from(
        &self,
        texts: &[&str],
        first: usize,
    ) -> Result<(Vec<Vec<Class>>, Timings)> {
        let t0 = Instant::now();
        let out = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let predictions =
                    self.model
                        .predict(t, self.top_k, self.threshold)
                        .map_err(|e| match e {
                            EngineError::Input(m) => {
                                EngineError::input(format!("text {}: {m}", first + i))
                            }
                            e => e,
                        })?;
                Ok(predictions
                    .into_iter()
                    .map(|p| Class {
                        index: p.index,
                        label: p.label,
                        score: p.prob,
                        logit: p.log_prob,
                    })
                    .collect())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((
            out,
            Timings {
                infer: t0.elapsed(),
                ..Default::default()
            },
        ))
    }
}
