//! `tensor`: named tensors in, named tensors out, for any model (what KServe v2 clients
//! send). Inputs are checked against the model's declared names, types and shapes, and
//! NaN/infinite values are refused.

use std::sync::Arc;
use std::time::Instant;

use super::Timings;
use crate::backend::{Backend, TensorSpec};
use crate::error::{EngineError, Result};
use crate::tensor::Tensor;

/// The tensor pipeline.
pub struct TensorPipeline {
    backend: Arc<dyn Backend>,
}

impl TensorPipeline {
    pub(crate) fn new(backend: Arc<dyn Backend>) -> Self {
        TensorPipeline { backend }
    }

    /// The model's inputs.
    pub fn inputs(&self) -> &[TensorSpec] {
        self.backend.inputs()
    }

    /// The model's outputs.
    pub fn outputs(&self) -> &[TensorSpec] {
        self.backend.outputs()
    }

    /// Run with inputs given by name (an empty name is accepted when the model has one input).
    pub fn run(
        &self,
        mut given: Vec<(String, Tensor)>,
    ) -> Result<(Vec<(String, Tensor)>, Timings)> {
        let t0 = Instant::now();
        let specs = self.backend.inputs();
        if specs.len() == 1 && given.len() == 1 && given[0].0.is_empty() {
            given[0].0 = specs[0].name.clone();
        }
        for (name, _) in &given {
            if !specs.iter().any(|s| &s.name == name) {
                let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                return Err(EngineError::input(format!(
                    "the model has no input {name:?}; its inputs are {names:?}"
                )));
            }
        }
        let mut ordered = Vec::with_capacity(specs.len());
        for spec in specs {
            let pos = given
                .iter()
                .position(|(n, _)| n == &spec.name)
                .ok_or_else(|| {
                    EngineError::input(format!(
                        "input {:?} ({} {}) is missing",
                        spec.name,
                        spec.dtype,
                        spec.shape_text()
                    ))
                })?;
            let (name, tensor) = given.swap_remove(pos);
            spec.check(&tensor)?;
            tensor.check_finite(&name)?;
            ordered.push(tensor);
        }
        let t1 = Instant::now();
        let outputs = self.backend.run(ordered)?;
        let t2 = Instant::now();
        let named = self
            .backend
            .outputs()
            .iter()
            .map(|s| s.name.clone())
            .zip(outputs)
            .collect();
        Ok((
            named,
            Timings {
                preprocess: t1 - t0,
                infer: t2 - t1,
                postprocess: t2.elapsed(),
            },
        ))
    }
}
