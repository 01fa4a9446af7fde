"""Runs one scheduled batch: vision tower for new images, the decoder over the paged KV cache, the sampler."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace

import torch

from stepserve.config import EngineConfig
from stepserve.engine.cuda_graph import DecodeGraphs, PrefillGraphs
from stepserve.engine.request import Sequence
from stepserve.engine.sampling import Sampler, SamplingBatch, mask_padded_vocab
from stepserve.engine.scheduler import ScheduledBatch
from stepserve.host_copy import to_device, to_device_aligned
from stepserve.layers.attention import build_context, forward_context, slot_of, step_slots
from stepserve.multimodal.encoder_cache import EncoderCache
from stepserve.multimodal.processor import ImageInput, pixel_inputs

log = logging.getLogger(__name__)

# Output rows of the images in one vision pass; each row is 16 patches in the tower (two stride-2
# downsamplers), so 4096 rows are ~65k patches: three 1280x720 images (1339 rows each).
VISION_ROWS_PER_PASS = 4096


@dataclass
class StepResult:
    seqs: list[Sequence]  # the sequences that sampled a token this step
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass
class LaunchedStep:
    """A step whose GPU work is queued: its sampled ids reach the host when `done` fires."""

    seqs: list[Sequence]
    token_ids: torch.Tensor | None  # host copies, filled asynchronously
    logprobs: torch.Tensor | None = None
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None
    done: torch.cuda.Event | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 eos_ids: list[int], num_tokens: int):
        self.config, self.model, self.device, self.dtype = config, model, device, dtype
        self.eos_ids = eos_ids
        self.num_tokens = num_tokens  # ids at or past this are padded vocabulary rows: never sampled
        self.page_size = config.page_size
        self.encoder_cache = EncoderCache(config.encoder_cache_size)
        self.num_encoded_images = 0
        self.sampler = Sampler()
        self.last_sampled: torch.Tensor | None = None  # the newest step's sampled ids, on the device
        vision = getattr(model, "vision_model", None)
        if vision is not None:
            vision.configure(replace(vision.options, attention=config.vision_attention))
        if device.type == "cuda":
            from stepserve.kernels import install_triton_kernels

            install_triton_kernels()
            if not config.disable_cuda_graph:
                self._compile_vision()
        self.num_pages = self._allocate_kv_cache()
        # Only an fp8 cache stores scaled values; the scale is the checkpoint's, else 1.0 as in vLLM.
        fp8_cache = config.kv_cache_dtype.startswith("fp8")
        self.kv_scale = float(getattr(model, "kv_cache_scale", 1.0)) if fp8_cache else 1.0
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None

    def capture_graphs(self, context_length: int) -> None:
        if self.device.type != "cuda" or self.config.disable_cuda_graph:
            return
        start, free = time.perf_counter(), torch.cuda.mem_get_info(self.device)[0]
        max_pages = -(-context_length // self.page_size)
        scratch_slot = self.num_pages * self.page_size
        pool = None
        if self.config.cuda_graph_max_tokens >= 16:
            self.prefill_graphs = PrefillGraphs(
                self.model.model, self.model.hidden_size, self.dtype, self.config.cuda_graph_max_tokens,
                self.config.max_running_requests, max_pages, context_length, scratch_slot, self.device, self.kv_scale)
            self.prefill_graphs.capture()
            pool = self.prefill_graphs.pool  # the two kinds never replay at once: one memory pool serves both
        self.graphs = DecodeGraphs(self.model, min(self.config.cuda_graph_max_bs, self.config.max_running_requests),
                                   max_pages, context_length, scratch_slot, self.device, self.kv_scale,
                                   self.num_tokens, pool)
        self.graphs.capture()
        log.info("captured CUDA graphs in %.1f s (%.2f GiB)", time.perf_counter() - start,
                 (free - torch.cuda.mem_get_info(self.device)[0]) / 2**30)

    @torch.inference_mode()
    def _compile_vision(self) -> None:
        """Compile the vision blocks and trigger both compiles (batch 1 specializes) at start-up, not on a request."""
        start = time.perf_counter()
        self.model.vision_model.compile_blocks()
        for views, crops in ((1, 0), (2, 2)):
            pixels = torch.randn(views, 3, 728, 728, device=self.device, dtype=self.dtype)
            patches = torch.randn(crops, 3, 504, 504, device=self.device, dtype=self.dtype) if crops else None
            self.model.encode_images(pixels, patches, [crops // views] * views)
        log.info("compiled the vision tower in %.1f s (attention: %s)", time.perf_counter() - start,
                 self.model.vision_model.attention_backend(self.device, self.dtype))

    # -- KV cache ---------------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> int:
        layers = self.model.attention_layers()
        heads, dim = layers[0].num_kv_heads, layers[0].head_dim
        kv_dtype = torch.float8_e4m3fn if self.config.kv_cache_dtype.startswith("fp8") else self.dtype
        page_bytes = 2 * len(layers) * self.page_size * heads * dim * torch.empty((), dtype=kv_dtype).element_size()
        num_pages = self.config.num_kv_pages or self._default_num_pages(page_bytes)
        if num_pages < 2:
            raise RuntimeError(f"not enough memory for the KV cache ({num_pages} pages of {page_bytes} bytes)")
        # One extra page past the pool: a scratch target for the K/V of CUDA-graph padding rows.
        for layer in layers:
            layer.kv_cache = torch.zeros(2, num_pages + 1, self.page_size, heads, dim, dtype=kv_dtype, device=self.device)
        log.info("KV cache: %d pages x %d tokens (%.2f GiB, %s)", num_pages, self.page_size,
                 num_pages * page_bytes / 2**30, kv_dtype)
        return num_pages

    def _default_num_pages(self, page_bytes: int) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.mem_fraction_static - used
            return int(budget // page_bytes) - 1
        # CPU: room for a few full contexts is plenty for the tiny model and tests.
        return 4 * max(self.config.context_length or 0, 8192) // self.page_size

    # -- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> LaunchedStep:
        """Queue the step's GPU work and return without waiting for it (`collect` waits)."""
        encoded = self.prefetch_images(batch)
        ids, positions, mm_rows, mm_mask = [], [], [], []
        pending_at, pending_rows = [], []  # inputs sampled by the previous step, still on the device
        for seq, n in zip(batch.seqs, batch.num_new):
            start = seq.num_computed
            if start + n > seq.num_known:
                pending_at.append(len(ids) + seq.num_known - start)
                pending_rows.append(seq.pending_row)
            ids.extend(seq.token_at(i) for i in range(start, start + n))
            positions.extend(range(start, start + n))
            if start < len(seq.prompt_ids) and seq.spans:
                self._image_rows(seq, start, start + n, mm_rows, mm_mask)
            else:
                mm_mask.extend([False] * n)
        mm_embeds = torch.cat(mm_rows).to(self.device, self.dtype) if mm_rows else None
        mask = to_device(torch.tensor(mm_mask, dtype=torch.bool), self.device) if mm_rows else None
        kv_lens = [s.num_computed + n for s, n in zip(batch.seqs, batch.num_new)]
        if batch.is_decode and not mm_rows and self.graphs is not None and self.graphs.can_run(len(batch)):
            tables = [s.pages for s in batch.seqs]
            slots = [slot_of(pages, p, self.page_size) for pages, p in zip(tables, positions)]
            logits = self.graphs.run(ids, positions, slots, kv_lens, tables, pending_at, pending_rows,
                                     self.last_sampled)
            return self._sample(batch.seqs, logits)
        tables = [s.pages for s in batch.seqs]
        input_ids, pos = to_device_aligned([ids, positions], torch.int64, self.device)
        if pending_at:
            at = to_device(torch.tensor(pending_at + pending_rows, dtype=torch.long), self.device)
            input_ids[at[: len(pending_at)]] = self.last_sampled[at[len(pending_at) :]]
        # A step that ran the vision tower stays eager: the host queues it while the GPU still runs the tower.
        if not encoded and self.prefill_graphs is not None and self.prefill_graphs.can_run(len(ids), len(batch)):
            embeds = self.model.get_input_embeddings(input_ids, mm_embeds, mask)
            hidden = self.prefill_graphs.run(embeds, positions, step_slots(batch.num_new, kv_lens, tables,
                                                                            self.page_size),
                                             batch.num_new, kv_lens, tables)
        else:
            ctx = build_context(batch.num_new, kv_lens, tables, self.page_size, self.device, self.kv_scale)
            with forward_context(ctx):
                hidden = self.model(input_ids, pos, mm_embeds, mask)
        sampled = [i for i in range(len(batch)) if batch.samples(i)]
        if not sampled:
            return LaunchedStep([], None)
        ends = list(itertools.accumulate(batch.num_new))
        last = to_device(torch.tensor([ends[i] - 1 for i in sampled]), self.device)
        logits = mask_padded_vocab(self.model.compute_logits(hidden[last]), self.num_tokens)
        seqs = [batch.seqs[i] for i in sampled]
        return self._sample(seqs, logits)

    # -- images -----------------------------------------------------------------------------------
    def _image_rows(self, seq: Sequence, start: int, end: int, rows: list, mask: list) -> None:
        """Append the feature rows of every image position in [start, end) and the chunk's mask."""
        chunk_mask = [False] * (end - start)
        for k, span in enumerate(seq.spans):
            if span.end <= start or span.start >= end:
                continue
            embeds = seq.image_embeds[k]  # filled by prefetch_images
            sel = [r for r, p in enumerate(span.positions) if start <= p < end]
            rows.append(embeds[sel[0] : sel[-1] + 1])
            for r in sel:
                chunk_mask[span.positions[r] - start] = True
            if span.end <= end:
                del seq.image_embeds[k]  # fully consumed by this chunk
        mask.extend(chunk_mask)

    def encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Vision tower + projector for a list of ImageInput (uint8 pixels, normalized and resized here), in
        passes of at most VISION_ROWS_PER_PASS output rows: a step that admits a dozen two-image requests
        would otherwise hold ~230k patches' MLP activations at once (4 GiB in one tensor: an OOM measured on
        the H100 at concurrency 100), while a pass of a few images already keeps the GEMMs at full speed."""
        groups: list[list[ImageInput]] = [[]]
        rows = 0
        for image in images:
            if groups[-1] and rows + image.num_feature_rows > VISION_ROWS_PER_PASS:
                groups.append([])
                rows = 0
            groups[-1].append(image)
            rows += image.num_feature_rows
        out: list[torch.Tensor] = []
        for group in groups:
            pixels, crops = pixel_inputs(group, self.device, self.dtype)
            out += self.model.encode_images(pixels, crops, [im.num_crops for im in group])
        self.num_encoded_images += len(images)
        return out

    def prefetch_images(self, batch: ScheduledBatch) -> bool:
        """Encode, batched, every not-yet-cached image this step's chunks touch; whether the tower ran."""
        missing: dict[str, ImageInput] = {}  # image hash -> the image, each distinct image once
        waiting: list[tuple[Sequence, int]] = []
        for seq, n in zip(batch.seqs, batch.num_new):
            for k, span in enumerate(seq.spans):
                overlaps = span.start < seq.num_computed + n and span.end > seq.num_computed
                if not overlaps or k in seq.image_embeds:
                    continue
                emb = self.encoder_cache.get(span.image.hash)
                if emb is None:
                    missing.setdefault(span.image.hash, span.image)
                    waiting.append((seq, k))
                else:
                    seq.image_embeds[k] = emb
        if not missing:
            return False
        fresh = dict(zip(missing, self.encode(list(missing.values()))))
        for h, emb in fresh.items():
            self.encoder_cache.put(h, emb)
        for seq, k in waiting:
            seq.image_embeds[k] = fresh[seq.spans[k].image.hash]
        return True

    # -- sampling ---------------------------------------------------------------------------------
    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> LaunchedStep:
        """Sample from logits whose padded vocabulary rows are already masked (`mask_padded_vocab`)."""
        sb = SamplingBatch.build(
            params=[s.params for s in seqs], seeds=[s.seed for s in seqs],
            steps=[len(s.output_ids) + s.num_pending for s in seqs],
            output_ids=[s.output_ids for s in seqs], prompt_ids=[s.prompt_ids for s in seqs],
            vocab_size=logits.shape[-1], device=self.device, eos_ids=self.eos_ids)
        res = self.sampler.sample(logits, sb)
        self.last_sampled = res.token_ids
        for row, seq in enumerate(seqs):
            seq.num_pending += 1
            seq.pending_row = row
        step = LaunchedStep(seqs, self._to_host(res.token_ids), self._to_host(res.logprobs),
                            None if res.top_logprobs is None else tuple(self._to_host(t) for t in res.top_logprobs))
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    def _to_host(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or self.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    @staticmethod
    def collect(step: LaunchedStep) -> StepResult:
        """Wait for a launched step's sampled ids (and logprobs) on the host."""
        if step.done is not None:
            step.done.synchronize()
        logprobs = step.logprobs.tolist() if step.logprobs is not None else None
        top = None
        if step.top_logprobs is not None:
            vals, idx = (t.tolist() for t in step.top_logprobs)
            top = [list(zip(i, v)) for i, v in zip(idx, vals)]
        return StepResult(step.seqs, step.token_ids.tolist() if step.seqs else [], logprobs, top)
