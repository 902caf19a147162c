//! The ONNX backend, through tract (pure Rust). It gives coverage of any ONNX model in
//! tract's operator set; mote's own kernels take over where speed matters.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::{Backend, TensorSpec};
use crate::error::{EngineError, Result};
use crate::tensor::{DType, Tensor as MoteTensor, TensorData};
use crate::threads::ThreadPool;

type Plan = Arc<TypedRunnableModel>;

/// An optimised ONNX graph ready to run.
///
/// tract cannot type every graph with two symbolic input dimensions (MiniLM's batch and
/// sequence give a "square of symbols"). Such graphs are planned with batch 1 and run one
/// row at a time: rows are then independent of each other by construction.
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

impl TractBackend {
    /// Parse, type-check and optimise an ONNX model.
    pub fn load(onnx: &[u8], pool: ThreadPool) -> Result<TractBackend> {
        let bad = |stage: &str, e: TractError| {
            EngineError::Model(format!("the ONNX graph cannot be {stage}: {e:#}"))
        };
        let model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .map_err(|e| bad("read", e))?;
        let (typed, per_row) = match model.into_optimized() {
            Ok(typed) => (typed, false),
            Err(first) => {
                // Intermediate shape annotations name the batch symbol too: drop them.
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
                match fixed.into_optimized() {
                    Ok(typed) => (typed, true),
                    Err(second) => {
                        return Err(EngineError::Model(format!(
                            "the ONNX graph cannot be optimised: {first:#}; with batch 1: {second:#}"
                        )));
                    }
                }
            }
        };
        let inputs = typed
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
        let mut inputs = inputs;
        if per_row {
            inputs.iter_mut().for_each(|s| s.shape[0] = None);
        }
        let outputs = typed
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
        let mut outputs = outputs;
        if per_row {
            outputs
                .iter_mut()
                .filter(|s| !s.shape.is_empty())
                .for_each(|s| s.shape[0] = None);
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
        self.run_once(inputs)
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
            return self.run_once(inputs);
        }
        let mut per_output: Vec<Vec<MoteTensor>> = Vec::new();
        for r in 0..rows {
            let row = inputs
                .iter()
                .map(|t| t.rows(r, 1))
                .collect::<Result<Vec<_>>>()?;
            for (i, out) in self.run_once(row)?.into_iter().enumerate() {
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
            .pool
            .install(|| self.plan.run(values))
            .map_err(|e| EngineError::Backend(format!("{e:#}")))?;
        outputs.iter().map(|t| from_tract(t)).collect()
    }
}
