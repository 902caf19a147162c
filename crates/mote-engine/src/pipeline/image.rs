//! `image-classification`: decode (PNG/JPEG, with size limits), resize the short side,
//! centre-crop, normalise to NCHW, run, softmax, top-k with the artifact's labels.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use image::imageops::FilterType;
use image::{ImageReader, Limits};
use serde::Serialize;

use super::Timings;
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::tensor::{DType, Tensor, TensorData};
use mote_store::ImageSettings;

/// Largest width or height accepted.
pub const MAX_SIDE: u32 = 8192;
/// Largest encoded image accepted, in bytes.
pub const MAX_IMAGE_BYTES: usize = 64 << 20;
/// Most images sent to the backend at once.
const MAX_ROWS_PER_RUN: usize = 16;

/// One predicted class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Class {
    /// Class index in the model's output.
    pub index: usize,
    /// Label from the artifact (or `class <index>` when it has none).
    pub label: String,
    /// Softmax probability.
    pub score: f32,
    /// Raw model output.
    pub logit: f32,
}

/// An image-classification pipeline.
pub struct ImageClassification {
    backend: Arc<dyn Backend>,
    settings: ImageSettings,
    labels: Vec<String>,
    top_k: usize,
}

impl ImageClassification {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        settings: ImageSettings,
        labels: Vec<String>,
    ) -> Result<ImageClassification> {
        let [input] = backend.inputs() else {
            return Err(EngineError::Model(format!(
                "an image classifier takes one input; this model has {}",
                backend.inputs().len()
            )));
        };
        if input.dtype != DType::F32 || input.shape.len() != 4 {
            return Err(EngineError::Model(format!(
                "an image classifier takes an FP32 [batch, 3, height, width] input; this one takes {} {}",
                input.dtype,
                input.shape_text()
            )));
        }
        let side = settings.crop as usize;
        if input.shape[1].is_some_and(|c| c != 3)
            || input.shape[2].is_some_and(|h| h != side)
            || input.shape[3].is_some_and(|w| w != side)
        {
            return Err(EngineError::Model(format!(
                "the model takes {} but the artifact's image settings crop to {side}x{side} RGB; re-import with --image-crop",
                input.shape_text()
            )));
        }
        Ok(ImageClassification {
            backend,
            settings,
            labels,
            top_k: 5,
        })
    }

    /// Return this many classes per image (default 5).
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k.max(1);
        self
    }

    /// Decode and preprocess one image into CHW floats.
    pub fn preprocess(&self, i: usize, bytes: &[u8]) -> Result<Vec<f32>> {
        preprocess(&self.settings, i, bytes)
    }

    /// Classify encoded images; results in input order.
    pub fn classify(&self, images: &[Vec<u8>]) -> Result<(Vec<Vec<Class>>, Timings)> {
        self.classify_from(images, 0)
    }

    /// [`classify`](Self::classify) for images that are part of a larger request whose
    /// first image here is number `first` (errors name the request's numbering).
    pub fn classify_from(
        &self,
        images: &[Vec<u8>],
        first: usize,
    ) -> Result<(Vec<Vec<Class>>, Timings)> {
        let t0 = Instant::now();
        let pixels = images
            .iter()
            .enumerate()
            .map(|(i, b)| self.preprocess(first + i, b))
            .collect::<Result<Vec<_>>>()?;
        let mut timings = Timings {
            preprocess: t0.elapsed(),
            ..Default::default()
        };
        let side = self.settings.crop as usize;
        let mut out = Vec::with_capacity(images.len());
        for chunk in pixels.chunks(MAX_ROWS_PER_RUN) {
            let t1 = Instant::now();
            let data: Vec<f32> = chunk.concat();
            let input = Tensor::new(vec![chunk.len(), 3, side, side], TensorData::F32(data))?;
            let outputs = self.backend.run(vec![input])?;
            let t2 = Instant::now();
            timings.infer += t2 - t1;
            let logits = outputs.first().and_then(Tensor::as_f32).ok_or_else(|| {
                EngineError::Backend("the classifier returned no FP32 output".into())
            })?;
            let classes = logits.len() / chunk.len();
            for row in logits.chunks_exact(classes) {
                out.push(self.top(row));
            }
            timings.postprocess += t2.elapsed();
        }
        Ok((out, timings))
    }

    fn top(&self, logits: &[f32]) -> Vec<Class> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        idx.into_iter()
            .take(self.top_k)
            .map(|i| Class {
                index: i,
                label: self
                    .labels
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("class {i}")),
                score: exps[i] / sum,
                logit: logits[i],
            })
            .collect()
    }
}

/// Decode one encoded image (image `i` of its request, for messages) and preprocess it
/// into CHW floats as `settings` say: the parser of untrusted image bytes, with its
/// byte, side and allocation limits.
pub fn preprocess(settings: &ImageSettings, i: usize, bytes: &[u8]) -> Result<Vec<f32>> {
    let bad = |m: String| EngineError::input(format!("image {i}: {m}"));
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(bad(format!(
            "{} bytes is more than the {MAX_IMAGE_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if reader.format().is_none() {
        return Err(bad("not a PNG or JPEG image".into()));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(512 << 20);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => bad(format!(
            "it is larger than the {MAX_SIDE}x{MAX_SIDE} limit; scale it down first"
        )),
        e => bad(format!(
            "it cannot be decoded ({e}); the file is corrupt or not a PNG/JPEG"
        )),
    })?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(bad("it has no pixels".into()));
    }
    let s = settings;
    let scale = s.resize as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(s.crop),
        ((h as f64 * scale).round() as u32).max(s.crop),
    );
    // A tiny file can be a 4000x2 image whose short side, scaled to `resize`, makes a
    // resized image of hundreds of megabytes: refuse what would outgrow the decode limit.
    if nw > MAX_SIDE || nh > MAX_SIDE {
        return Err(bad(format!(
            "its {w}x{h} shape is too elongated: scaling its short side to {} would make it {nw}x{nh}, more than {MAX_SIDE} pixels on a side; crop it first",
            s.resize
        )));
    }
    let resized = image::imageops::resize(&rgb, nw, nh, FilterType::Triangle);
    let (x0, y0) = ((nw - s.crop) / 2, (nh - s.crop) / 2);
    let side = s.crop as usize;
    let mut chw = vec![0f32; 3 * side * side];
    for y in 0..side {
        for x in 0..side {
            let p = resized.get_pixel(x0 + x as u32, y0 + y as u32);
            for c in 0..3 {
                chw[c * side * side + y * side + x] = (p[c] as f32 / 255.0 - s.mean[c]) / s.std[c];
            }
        }
    }
    Ok(chw)
}
