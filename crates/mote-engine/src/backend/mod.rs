//! Backends run a model's graph on tensors. Pipelines talk to them only through [`Backend`];
//! nothing above the pipeline layer sees a concrete backend.

pub mod tract;

use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// One input or output of a model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorSpec {
    /// The graph's name for it.
    pub name: String,
    /// Element type.
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    /// Dimensions; `None` where the model accepts any size.
    pub shape: Vec<Option<usize>>,
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.kserve_name())
}

impl TensorSpec {
    /// Check a tensor against this spec, naming what does not fit.
    pub fn check(&self, t: &Tensor) -> Result<()> {
        use crate::error::EngineError;
        if t.dtype() != self.dtype {
            return Err(EngineError::input(format!(
                "input {:?} must be {} but {} was given",
                self.name,
                self.dtype,
                t.dtype()
            )));
        }
        let fits = t.shape().len() == self.shape.len()
            && t.shape()
                .iter()
                .zip(&self.shape)
                .all(|(&d, s)| s.is_none_or(|s| s == d));
        if !fits {
            return Err(EngineError::input(format!(
                "input {:?} must have shape {} but {:?} was given",
                self.name,
                self.shape_text(),
                t.shape()
            )));
        }
        if t.shape().contains(&0) {
            return Err(EngineError::input(format!(
                "input {:?} is empty (shape {:?})",
                self.name,
                t.shape()
            )));
        }
        Ok(())
    }

    /// The shape as users read it, `?` for dynamic dimensions.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| d.map_or("?".into(), |d| d.to_string()))
            .collect();
        format!("[{}]", dims.join(", "))
    }
}

/// Something that runs a model graph.
pub trait Backend: Send + Sync {
    /// Short name, e.g. `tract`.
    fn name(&self) -> &'static str;
    /// The graph's inputs, in order.
    fn inputs(&self) -> &[TensorSpec];
    /// The graph's outputs, in order.
    fn outputs(&self) -> &[TensorSpec];
    /// Run once; `inputs` are in [`Backend::inputs`] order and already checked.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>>;
    /// Whether a row padded with attention-mask-0 positions gives, at its other positions,
    /// the same bits as the row unpadded (so texts of different lengths may share a run).
    fn pads_exactly(&self) -> bool {
        false
    }
}
