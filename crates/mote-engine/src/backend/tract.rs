//! The ONNX backend, through tract (pure Rust). It gives coverage of any ONNX model in
//! tract's operator set; mote's own kernels take over where speed matters.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::{Backend, TensorSpec};
use crate::error::{EngineError, Result};
use crate::tensor::{DType, Tensor as MoteTensor, TensorData};
use crate::threads::ThreadPool;

type Plan = Arc<TypedRunnableModel>;

/// An optimised ONNX graph ready to run.
///
/// Graphs whose inputs all start with a batch dimension are planned for batch 1 and run one
/// row at a time. That makes a row's output independent of its batch-mates by construction
/// (the determinism contract), lets tract plan with every other dimension concrete where
/// the model fixes them (a CNN runs several times faster than with a symbolic batch), and
/// sidesteps graphs tract cannot type with two symbolic dimensions (MiniLM's batch and
/// sequence). Several rows run in parallel, one per thread; a single row spreads over the
/// pool instead.
pub struct TractBackend {
    plan: Plan,
    per_row: bool,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    pool: ThreadPool,
}

fn dtype_of(dt: DatumType) -> Option<DType> {
    Some(match dt {
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::I64 => DType::I64,
        DatumType::I32 => DType::I32,
        DatumType::U8 => DType::U8,
        DatumType::I8 => DType::I8,
        DatumType::Bool => DType::Bool,
        _ => return None,
    })
}

fn spec(name: String, fact: &TypedFact) -> Result<TensorSpec> {
    let dtype = dtype_of(fact.datum_type).ok_or_else(|| {
        EngineError::Unsupported(format!(
            "tensor {name:?} has element type {:?}, which mote does not exchange yet",
            fact.datum_type
        ))
    })?;
    let shape = fact
        .shape
        .iter()
        .map(|d| d.to_i64().ok().map(|v| v as usize))
        .collect();
    Ok(TensorSpec { name, dtype, shape })
}

fn bad(stage: &str, e: TractError) -> EngineError {
    EngineError::Model(format!("the ONNX graph cannot be {stage}: {e:#}"))
}

/// True when every input's first dimension is a symbol (or 1): a batch axis.
fn has_batch_axis(model: &InferenceModel) -> Result<bool> {
    let n = model
        .input_outlets()
        .map_err(|e| bad("inspected", e))?
        .len();
    for i in 0..n {
        let fact = model.input_fact(i).map_err(|e| bad("inspected", e))?;
        let first = fact.shape.dims().next().and_then(|d| d.concretize());
        match first {
            Some(d) if d.to_i64().is_ok_and(|v| v != 1) => return Ok(false),
            None if fact.shape.rank().concretize() == Some(0) => return Ok(false),
            _ => {}
        }
    }
    Ok(n > 0)
}

impl TractBackend {
    /// Parse, type-check and optimise an ONNX model.
    pub fn load(onnx: &[u8], pool: ThreadPool) -> Result<TractBackend> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .map_err(|e| bad("read", e))?;
        let per_row = has_batch_axis(&model)?;
        let typed = if per_row {
            // Intermediate shape annotations name the batch symbol too: let tract infer them.
            let mut fixed = tract_onnx::onnx()
                .with_ignore_value_info(true)
                .with_ignore_output_shapes(true)
                .model_for_read(&mut &onnx[..])
                .map_err(|e| bad("read", e))?;
            let n = fixed
                .input_outlets()
                .map_err(|e| bad("inspected", e))?
                .len();
            for i in 0..n {
                let mut fact = fixed
                    .input_fact(i)
                    .map_err(|e| bad("inspected", e))?
                    .clone();
                fact.shape.set_dim(0, 1.to_dim());
                fixed = fixed
                    .with_input_fact(i, fact)
                    .map_err(|e| bad("inspected", e))?;
            }
            fixed.into_optimized().map_err(|e| bad("optimised", e))?
        } else {
            model.into_optimized().map_err(|e| bad("optimised", e))?
        };
        let mut inputs = typed
            .input_outlets()
            .map_err(|e| bad("inspected", e))?
            .iter()
            .map(|o| {
                let name = typed.node(o.node).name.clone();
                spec(
                    name,
                    typed.outlet_fact(*o).map_err(|e| bad("inspected", e))?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut outputs = typed
            .output_outlets()
            .map_err(|e| bad("inspected", e))?
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let name = typed
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("output_{i}"));
                spec(
                    name,
                    typed.outlet_fact(*o).map_err(|e| bad("inspected", e))?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        if per_row {
            for s in inputs.iter_mut().chain(outputs.iter_mut()) {
                if let Some(first) = s.shape.first_mut() {
                    *first = None;
                }
            }
        }
        let plan = typed.into_runnable().map_err(|e| bad("planned", e))?;
        Ok(TractBackend {
            plan,
            per_row,
            inputs,
            outputs,
            pool,
        })
    }
}

fn to_tract(t: MoteTensor) -> Result<TValue> {
    let shape = t.shape().to_vec();
    let err = |e: tract_ndarray::ShapeError| EngineError::input(format!("bad tensor shape: {e}"));
    let tensor: Tensor = match t.into_data() {
        TensorData::F32(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map_err(err)?
            .into_tensor(),
        TensorData::F64(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map_err(err)?
            .into_tensor(),
        TensorData::I64(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map_err(err)?
            .into_tensor(),
        TensorData::I32(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map_err(err)?
            .into_tensor(),
        TensorData::U8(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map_err(err)?
            .into_tensor(),
        TensorData::I8(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map_err(err)?
            .into_tensor(),
        TensorData::Bool(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .map_err(err)?
            .into_tensor(),
    };
    Ok(tensor.into_tvalue())
}

fn from_tract(t: &Tensor) -> Result<MoteTensor> {
    let shape = t.shape().to_vec();
    let fail = |e: TractError| EngineError::Backend(format!("{e:#}"));
    let data = match t.datum_type() {
        DatumType::F32 => TensorData::F32(
            t.to_plain_array_view::<f32>()
                .map_err(fail)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::F64 => TensorData::F64(
            t.to_plain_array_view::<f64>()
                .map_err(fail)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I64 => TensorData::I64(
            t.to_plain_array_view::<i64>()
                .map_err(fail)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I32 => TensorData::I32(
            t.to_plain_array_view::<i32>()
                .map_err(fail)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::U8 => TensorData::U8(
            t.to_plain_array_view::<u8>()
                .map_err(fail)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I8 => TensorData::I8(
            t.to_plain_array_view::<i8>()
                .map_err(fail)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::Bool => TensorData::Bool(
            t.to_plain_array_view::<bool>()
                .map_err(fail)?
                .iter()
                .copied()
                .collect(),
        ),
        other => {
            return Err(EngineError::Unsupported(format!(
                "the model produced element type {other:?}, which mote does not exchange yet"
            )));
        }
    };
    MoteTensor::new(shape, data)
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<MoteTensor>) -> Result<Vec<MoteTensor>> {
        if self.per_row {
            return self.run_rows(inputs);
        }
        self.pool.intra_op(|| self.run_once(inputs))
    }
}

impl TractBackend {
    fn run_rows(&self, inputs: Vec<MoteTensor>) -> Result<Vec<MoteTensor>> {
        let rows = inputs
            .first()
            .and_then(|t| t.shape().first().copied())
            .unwrap_or(1);
        if inputs.iter().any(|t| t.shape().first() != Some(&rows)) {
            return Err(EngineError::input(
                "all inputs must have the same batch size (first dimension)",
            ));
        }
        if rows == 1 {
            return self.pool.intra_op(|| self.run_once(inputs));
        }
        let split = (0..rows)
            .map(|r| {
                inputs
                    .iter()
                    .map(|t| t.rows(r, 1))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let results = self.pool.map(split, |row| self.run_once(row));
        let mut per_output: Vec<Vec<MoteTensor>> = Vec::new();
        for outputs in results {
            for (i, out) in outputs?.into_iter().enumerate() {
                if per_output.len() <= i {
                    per_output.push(Vec::with_capacity(rows));
                }
                per_output[i].push(out);
            }
        }
        per_output
            .into_iter()
            .map(MoteTensor::concat_rows)
            .collect()
    }

    fn run_once(&self, inputs: Vec<MoteTensor>) -> Result<Vec<MoteTensor>> {
        let values = inputs
            .into_iter()
            .map(to_tract)
            .collect::<Result<TVec<_>>>()?;
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| EngineError::Backend(format!("{e:#}")))?;
        outputs.iter().map(|t| from_tract(t)).collect()
    }
}
