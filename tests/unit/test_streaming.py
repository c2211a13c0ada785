"""The streaming pipeline on the tiny families (eager reference): multi-turn KV reuse, barge-in,
seamless streamed speech, VAD, incremental audio encoding, and its input errors."""

import numpy as np
import pytest
import torch

from omni_export.api import eager_pipeline
from omni_export.errors import (
    AudioInputError,
    ConfigError,
    ContextOverflowError,
    ImageInputError,
    InputError,
)
from omni_export.runtime_py.audio import read_audio
from omni_export.runtime_py.events import AudioChunk, Stats, TextDelta
from omni_export.runtime_py.pipeline import Pipeline
from omni_export.runtime_py.prompt import chat_prompt, next_turn
from omni_export.runtime_py.sampler import frame_noise
from omni_export.runtime_py.speech import CosyVoice2Stream, VitaCodecStream
from omni_export.runtime_py.vad import EnergyVAD
from omni_export.runtime_py.voice import VoicePrompt

FAMILIES = ("interactiveomni", "vita15")
QUESTIONS = ("Name three colours.", "And two animals?", "Which one is the largest?")


@pytest.fixture(scope="module")
def pipes(tiny):
    return {f: eager_pipeline(ck, max_context=512) for f, ck in tiny.items()}


def turn(p, text, **kw):
    p.add_text(text)
    events = list(p.respond_stream(**kw))
    assert isinstance(events[-1], Stats) and not any(isinstance(e, Stats) for e in events[:-1])
    return events, events[-1]


def ids_of(p, text):
    return p.tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("family", FAMILIES)
def test_three_turns_keep_the_cache_and_equal_one_long_prefill(pipes, family):
    """Turns 2 and 3 prefill only their own tokens; the answer of turn 3 equals greedy decoding
    after prefilling the whole transcript at once on a fresh cache."""
    p = pipes[family]
    p.reset()
    system = p.config["prompt"]["system"]
    transcript, outs = [], []
    for i, q in enumerate(QUESTIONS):
        start = len(p.recorder.spans)
        events, stats = turn(p, q, max_new_tokens=6, speech=False)
        new = ids_of(p, chat_prompt(q, system) if i == 0 else next_turn(q))
        prefilled = sum(s.positions for s in p.recorder.spans[start:] if s.stage == "llm.prefill")
        assert stats.prompt_tokens == len(new) == prefilled
        out = [e.token_id for e in events if isinstance(e, TextDelta)]
        transcript += new + out
        outs.append(out)
        assert stats.position == len(transcript) == p.position
    assert len(ids_of(p, next_turn(QUESTIONS[1]))) < len(ids_of(p, chat_prompt(QUESTIONS[1], system)))

    p.reset()
    ids = transcript[: len(transcript) - len(outs[-1])]
    logits = p.llm.feed(p.sessions["llm"].run("embed", [torch.tensor([ids])])[0])[0]
    greedy = []
    for _ in outs[-1]:
        greedy.append(int(logits[0, -1].argmax()))
        logits = p.llm.feed(p.sessions["llm"].run("embed", [torch.tensor([[greedy[-1]]])])[0])[0]
    assert greedy == outs[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_barge_in_stops_audio_within_one_chunk_and_the_next_turn_goes_on(pipes, family):
    p = pipes[family]
    p.reset()
    p.add_text("Tell me a long story about a cat and a dog.")
    after, shown, chunks = [], [], 0
    for ev in p.respond_stream(max_new_tokens=60):
        if chunks:
            after.append(ev)
        if isinstance(ev, TextDelta):
            shown.append(ev.token_id)
        if isinstance(ev, AudioChunk):
            chunks += 1
            p.interrupt()
    stats = after[-1]
    assert chunks == 1 and isinstance(stats, Stats) and stats.interrupted
    assert not any(isinstance(e, (AudioChunk, TextDelta)) for e in after)  # nothing after the barge-in
    assert stats.new_tokens == len(shown) < 60
    assert p.position == stats.prompt_tokens + len(shown)  # the cache holds exactly what was shown
    before = p.position
    events, nxt = turn(p, "Stop. What is two plus two?", max_new_tokens=5)
    assert not nxt.interrupted and nxt.prompt_tokens == len(ids_of(p, next_turn("Stop. What is two plus two?")))
    assert p.position == before + nxt.prompt_tokens + nxt.new_tokens


@pytest.mark.parametrize("window", [None, 20])
def test_streamed_speech_equals_one_shot_synthesis(pipes, window, monkeypatch):
    """CosyVoice2: streamed mel equals one flow solve over all tokens (chunk-causal), and the
    streamed PCM equals one vocoder call over all mel, its harmonic source included (the same
    noise per frame, the phase carried across windows): the seams add nothing (no clicks). With
    a short traced window (20 frames) each chunk's mel is vocoded in several windows, the same."""
    p = pipes["interactiveomni"]
    if window is not None:
        monkeypatch.setitem(p.config["speech"], "vocoder_window", window)
    g = torch.Generator().manual_seed(1)
    st = CosyVoice2Stream(p, 0)
    pieces = [x for i in range(30) for x in st.push(i, torch.randn(1, 1, p.config["llm"]["hidden_size"], generator=g))]
    streamed_before_finish = len(pieces)
    pieces += list(st.finish())
    assert streamed_before_finish >= 2  # audio came out while text was still arriving
    pcm = np.concatenate(pieces)
    ratio = p.config["speech"]["token_mel_ratio"]
    assert ratio * len(st.tokens) == st.mel.shape[-1] == len(pcm) // p.config["speech"]["vocoder_hop"]
    voc, sp = p.sessions["vocoder"], p.config["speech"]
    noise = frame_noise(torch.Generator().manual_seed(1), sp["vocoder_harmonics"], sp["vocoder_hop"], st.mel.shape[-1])
    source = voc.run("source", [st.mel, torch.zeros(1, sp["vocoder_harmonics"]), torch.tensor([0]), noise])[0]
    one_shot = voc.run("decode", [st.mel, source])[0][0].numpy()
    assert np.abs(pcm - one_shot).max() < 1e-4 * max(1.0, np.abs(one_shot).max())
    assert np.sqrt(np.mean(one_shot**2)) > 1e-3  # there is sound to compare


def test_streamed_mel_equals_one_flow_solve(tiny, pipes):
    p = pipes["interactiveomni"]
    g = torch.Generator().manual_seed(2)
    st = CosyVoice2Stream(p, 3)
    for i in range(24):
        list(st.push(i, torch.randn(1, 1, p.config["llm"]["hidden_size"], generator=g)))
    list(st.finish())
    flow = tiny["interactiveomni"].components["flow"]
    assert len(st.tokens) % flow.cfg.token_chunk  # the last chunk was short (padded and masked)
    assert len(st.tokens) <= flow.cfg.exact_tokens
    with torch.no_grad():
        mu = flow.encode(torch.tensor([st.tokens]))
        mel = flow.solve(mu, st.spks, st.noise[..., : mu.shape[-1]])
    assert torch.allclose(mel, st.mel, atol=1e-4), (mel - st.mel).abs().max()


def test_a_voice_prompt_leads_the_flow_and_is_not_spoken(tiny, pipes, monkeypatch):
    """CosyVoice2's zero-shot flow input: the prompt's speech tokens lead the reply's through the
    flow and its mel conditions their frames; what is spoken is the reply's frames only, equal to
    the whole-sequence flow over [prompt, reply] with the prompt mel as condition."""
    p = pipes["interactiveomni"]
    g = torch.Generator().manual_seed(4)
    prompt = VoicePrompt(tuple(torch.randint(0, 6561, (31,), generator=g).tolist()), torch.randn(80, 62, generator=g))
    monkeypatch.setattr(p, "voice_prompt", prompt)
    st = CosyVoice2Stream(p, 3)
    for i in range(20):
        list(st.push(i, torch.randn(1, 1, p.config["llm"]["hidden_size"], generator=g)))
    list(st.finish())
    flow = tiny["interactiveomni"].components["flow"]
    n = len(st.tokens)
    assert st.mel.shape[-1] == 2 * n and st.noise.shape[-1] == 2 * (31 + n) and 31 + n <= flow.cfg.exact_tokens
    with torch.no_grad():
        mu = flow.encode(torch.tensor([list(prompt.tokens) + st.tokens]))
        cond = torch.cat([prompt.mel[None], torch.zeros(1, 80, 2 * n)], dim=-1)
        mel = flow.solve(mu, st.spks, st.noise, cond)
        unprompted = flow.solve(flow.encode(torch.tensor([st.tokens])), st.spks, st.noise[..., 62:])
    assert torch.allclose(mel[..., 62:], st.mel, atol=1e-4), (mel[..., 62:] - st.mel).abs().max()
    assert (unprompted - st.mel).abs().max() > 1e-2  # the prompt changed the speech


def long_reply(p, n_text, seed):
    """A stream pushed ``n_text`` text tokens (a sentence end every 20) and finished."""
    g = torch.Generator().manual_seed(seed)
    st = CosyVoice2Stream(p, seed)
    dot, word = ids_of(p, "."), ids_of(p, " so")
    pcm = []
    for i in range(n_text):
        pcm += st.push((dot if i % 20 == 19 else word)[0], torch.randn(1, 1, p.config["llm"]["hidden_size"], generator=g))
    pcm += st.finish()
    return st, np.concatenate(pcm)


def test_long_speech_costs_the_same_per_chunk_and_matches_the_offline_flow(tiny, pipes):
    """Past the flow's window each chunk still makes one call per method with the same shapes,
    the mel within the window equals the whole-sequence flow exactly, and beyond it stays within
    the stated tolerance (attention reaches back ``left_chunks`` chunks instead of to the start)."""
    p = pipes["interactiveomni"]
    flow = tiny["interactiveomni"].components["flow"]
    start = len(p.recorder.spans)
    st, pcm = long_reply(p, 90, 5)
    chunk, window = flow.cfg.token_chunk, flow.cfg.window
    assert len(st.tokens) > window + 2 * chunk  # well past the window
    chunks = -(-len(st.tokens) // chunk)
    calls = [s.stage for s in p.recorder.spans[start:]]
    assert calls.count("flow.encode_chunk") == chunks
    assert calls.count("flow.step_chunk") == chunks * (len(st.timesteps) - 1)
    assert len(pcm) == st.mel.shape[-1] * p.config["speech"]["vocoder_hop"]
    with torch.no_grad():
        mu = flow.encode(torch.tensor([st.tokens]))
        mel = flow.solve(mu, st.spks, st.noise[..., : mu.shape[-1]])
    exact = flow.cfg.token_mel_ratio * flow.cfg.exact_tokens
    assert torch.allclose(mel[..., :exact], st.mel[..., :exact], atol=1e-4)
    beyond = (mel[..., exact:] - st.mel[..., exact:]).abs().max() / mel.abs().max()
    assert 0 < beyond < 0.05, beyond


def test_a_reply_longer_than_the_speech_lm_context_is_spoken_in_segments(tiny):
    """A speech LM with room for 1 + 8 positions per text token for 25 text tokens: a 120-token
    reply ends its segments at sentence ends (or full budgets) and every segment is spoken;
    no segment overflows the cache."""
    p = eager_pipeline(tiny["interactiveomni"], max_context=256)
    st, pcm = long_reply(p, 120, 1)
    assert st.segment_text == 25
    resets = [s for s in p.recorder.spans if s.stage == "speech_lm.embed_special"]
    assert len(resets) >= 2 * (120 // 25)  # a sos and a task row per segment
    assert st.slm.position <= st.slm.max_len and len(st.tokens) > st.slm.max_len
    assert len(pcm) == st.mel.shape[-1] * p.config["speech"]["vocoder_hop"] > 0


def test_vita_segments_join_without_steps(pipes):
    p = pipes["vita15"]
    st = VitaCodecStream(p, 0)
    pieces = [x for i in range(40) for x in st.push(100 + i, torch.zeros(1))] + list(st.finish())
    assert len(pieces) >= 2
    for x in pieces:  # every seam starts and ends at silence
        assert abs(x[0]) < 0.02 * np.abs(x).max() + 1e-6 and abs(x[-1]) < 0.02 * np.abs(x).max() + 1e-6


def test_vad_ends_the_turn_after_the_speech(speech_wav):
    sr = 16000
    wav = np.concatenate([np.zeros(sr // 2, np.float32), read_audio(speech_wav, sr), np.zeros(sr * 2, np.float32)])
    voiced = np.flatnonzero(np.abs(wav) > 0.02)
    speech_end = voiced[-1] / sr
    vad, step = EnergyVAD(sr), int(0.16 * sr)
    ended_at = next(k / sr for k in range(0, len(wav), step) if vad.push(wav[k : k + step]))
    assert speech_end < ended_at <= speech_end + vad.cfg.hangover_ms / 1000 + 0.2
    quiet = EnergyVAD(sr)
    assert not quiet.push(np.zeros(sr * 3, np.float32))  # silence alone never ends a turn


def test_audio_is_encoded_window_by_window_while_it_arrives(tiny, speech_wav):
    p = eager_pipeline(tiny["interactiveomni"], max_context=512, audio_window_frames=100)  # 1 s windows
    spoken = read_audio(speech_wav, 16000)
    wav = np.concatenate([spoken, spoken, spoken])[: int(2.5 * 16000)]
    step = int(0.16 * 16000)
    for k in range(0, len(wav), step):
        p.push_audio(wav[k : k + step])
    encoded_before_end = sum(s.stage == "audio_encoder.forward" for s in p.recorder.spans)
    p.end_turn()
    windows = [s for s in p.recorder.spans if s.stage == "audio_encoder.forward"]
    assert encoded_before_end == 2 and len(windows) == 3  # only the last half second is left for the end
    offline = torch.cat([p.encode_audio(wav[i : i + 16000]) for i in range(0, len(wav), 16000)])
    assert torch.allclose(torch.cat(p._turn.audio_tokens), offline)
    default = eager_pipeline(tiny["interactiveomni"], max_context=512)
    default.push_audio(wav)
    assert not any(s.stage == "audio_encoder.forward" for s in default.recorder.spans)  # Whisper: one 30 s window


def test_bad_inputs_are_clear_errors(pipes, tmp_path):
    p = pipes["vita15"]
    p.reset()
    with pytest.raises(AudioInputError, match="empty"):
        p.push_audio(np.zeros(0, np.float32))
    with pytest.raises(AudioInputError, match="cannot be resampled"):
        p.push_audio(np.zeros(1000, np.float32), sample_rate=1_000_000)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageInputError, match="cannot decode image"):
        p.add_image(bad)
    with pytest.raises(InputError, match="nothing to answer"):
        list(p.respond_stream())


def test_context_policy_error_keeps_the_conversation_and_reset_drops_it(tiny, pipes):
    first_q, second_q, new = "Hello there.", "Please go on with a longer answer.", 20
    probe = pipes["interactiveomni"]
    probe.reset()
    turn(probe, first_q, max_new_tokens=new, speech=False)
    context = probe.position + len(ids_of(probe, next_turn(second_q))) + new - 1  # turn 2 misses by one position
    assert len(ids_of(probe, chat_prompt(second_q, probe.config["prompt"]["system"]))) + new <= context  # alone it fits

    p = eager_pipeline(tiny["interactiveomni"], max_context=context)
    turn(p, first_q, max_new_tokens=new, speech=False)
    position = p.position
    p.add_text(second_q)
    with pytest.raises(ContextOverflowError, match="Call reset"):
        list(p.respond_stream(max_new_tokens=new, speech=False))
    assert p.position == position  # nothing was changed
    q = eager_pipeline(tiny["interactiveomni"], max_context=context, context_policy="reset")
    turn(q, first_q, max_new_tokens=new, speech=False)
    _, second = turn(q, second_q, max_new_tokens=new, speech=False)
    assert second.context_reset and second.position == second.prompt_tokens + second.new_tokens


def test_explicit_cache_backends_hold_the_same_conversation(tiny, pipes):
    """KVStack drives a session that takes and returns the KV cache as tensors (the eager LLM with
    its stack in io mode, the contract ONNX Runtime and TensorRT keep): three turns give the same
    tokens as the stateful eager session."""
    from omni_export.export.golden import eager_io_session
    from omni_export.export.trace_specs import Limits

    ref = pipes["interactiveomni"]
    ref.reset()
    expected = [[e.token_id for e in turn(ref, q, max_new_tokens=5, speech=False)[0] if isinstance(e, TextDelta)] for q in QUESTIONS]

    base = eager_pipeline(tiny["interactiveomni"], max_context=512)
    session = eager_io_session(tiny["interactiveomni"].components["llm"], Limits(max_context=512))
    assert not session.stateful
    sessions = dict(base.raw_sessions, llm=session)
    components = dict(base.components)
    p = Pipeline(sessions, components, base.config, base.tokenizer, base.assets)
    got = [[e.token_id for e in turn(p, q, max_new_tokens=5, speech=False)[0] if isinstance(e, TextDelta)] for q in QUESTIONS]
    assert got == expected and p.llm.holds_cache and p.position == ref.position


@pytest.mark.gpu
def test_eager_reference_on_cuda_matches_cpu(tiny_dirs):
    """The GPU reference (fp32 on CUDA) answers with the CPU's greedy tokens and speech length."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the lent GPU machine; never CI)")
    from omni_export.api import load

    cpu = eager_pipeline(load(tiny_dirs["interactiveomni"]), max_context=256)
    gpu = eager_pipeline(load(tiny_dirs["interactiveomni"]), max_context=256, device="cuda")
    a = cpu.respond(text="Name three colours.", max_new_tokens=8)
    b = gpu.respond(text="Name three colours.", max_new_tokens=8)
    assert a.token_ids == b.token_ids and b.audio.size > 0


def test_a_48khz_microphone_stream_is_resampled_as_one_stream(tiny, speech_wav):
    """160 ms chunks at 48 kHz through push_audio give exactly the offline resample of the whole
    stream (tolerance 1e-6: the same soxr filter, its state carried across chunks); resampling
    each chunk on its own, as before, put an edge at every chunk boundary."""
    from omni_export.runtime_py.audio import StreamResampler, resample

    mic = read_audio(speech_wav, 48000)
    step = int(0.16 * 48000)
    offline = resample(mic, 48000, 16000)
    stream = StreamResampler(48000, 16000)
    chunked = np.concatenate([*(stream.push(mic[k : k + step]) for k in range(0, len(mic), step)), stream.flush()])
    assert len(chunked) == len(offline) and np.abs(chunked - offline).max() <= 1e-6
    per_chunk = np.concatenate([resample(mic[k : k + step], 48000, 16000) for k in range(0, len(mic), step)])
    assert np.abs(per_chunk[: len(offline)] - offline).max() > 100 * max(np.abs(chunked - offline).max(), 1e-7)
    p = eager_pipeline(tiny["interactiveomni"], max_context=512)
    for k in range(0, len(mic), step):
        p.push_audio(mic[k : k + step], sample_rate=48000)
    p._flush_resampler()
    assert np.abs(np.concatenate(p._turn.unencoded) - offline).max() <= 1e-6


def test_a_speech_lm_too_small_for_one_text_chunk_is_a_clear_error(tiny):
    p = eager_pipeline(tiny["interactiveomni"], max_context=40)
    with pytest.raises(ContextOverflowError, match="cannot hold one text chunk"):
        CosyVoice2Stream(p, 0)


def test_bistream_stops_a_text_chunk_early_when_the_model_asks_for_more_text(pipes, monkeypatch):
    """CosyVoice2's fill token: after at most speech_chunk speech tokens the next text chunk comes;
    a fill the model samples sooner ends the chunk there, is neither spoken nor fed back, and
    end-of-speech is never sampled while text is still coming."""
    import omni_export.runtime_py.speech as speech

    p = pipes["interactiveomni"]
    c = p.config["speech"]
    seen: list[tuple[int | None, tuple[int, ...]]] = []
    real = speech.sample

    def pick(logits, top_k, gen, allowed=None, banned=()):  # type: ignore[no-untyped-def]
        seen.append((allowed, banned))
        # the 4th draw of every text chunk asks for more text
        return c["fill"] if allowed == c["fill"] + 1 and len(seen) % 4 == 0 else real(logits, top_k, gen, allowed, banned)

    monkeypatch.setattr(speech, "sample", pick)
    st = CosyVoice2Stream(p, 0)
    g = torch.Generator().manual_seed(4)
    for i in range(4 * c["text_chunk"]):
        list(st.push(i, torch.randn(1, 1, p.config["llm"]["hidden_size"], generator=g)))
    assert len(st.tokens) == 4 * 3  # 3 speech tokens, then the sampled fill, per text chunk
    assert all(t < c["speech_vocab"] for t in st.tokens)
    assert all(b == (c["eos"], c["eos"] + 1) for a, b in seen)  # eos (and the unused id) banned mid-text


def test_interactiveomni_encodes_audio_in_whisper_s_30_s_window(pipes):
    """transformers' WhisperEncoder takes 3000-frame inputs only, so the release pads every clip
    with silence to 30 s; the clip's own tokens are kept (25 a second)."""
    p = pipes["interactiveomni"]
    sr = p.config["audio_sample_rate"]
    assert p.config["audio_pad_samples"] == 30 * sr
    wav = (0.1 * np.sin(2 * np.pi * 220 * np.arange(2 * sr) / sr)).astype(np.float32)
    tokens = p.encode_audio(wav)
    padded = np.zeros(30 * sr, dtype=np.float32)
    padded[: len(wav)] = wav
    whole = p.encode_audio(padded)
    assert tokens.shape[0] == 50 and whole.shape[0] == 750
    assert torch.allclose(tokens, whole[:50], atol=1e-5)


def test_a_vita_segment_is_spoken_in_the_releases_order(pipes):
    """VITA-1.5's llm2tts: the segment's input embeddings as frames of the TTS width through the
    NAR, the prefix [bos, NAR output] as one call, then sos, then one code at a time; a bundle
    whose speech config predates that is refused with what to do."""
    p = pipes["vita15"]
    c = p.config["speech"]
    st = VitaCodecStream(p, 0)
    calls = []
    ar, nar = st.ar.session, p.sessions["tts_nar"]
    run_ar, run_nar = ar.run, nar.run

    def spy_ar(method, inputs):  # type: ignore[no-untyped-def]
        calls.append((method, int(inputs[0][0, 0]) if method == "embed_codes" else tuple(inputs[0].shape)))
        return run_ar(method, inputs)

    ar.run = spy_ar
    nar.run = lambda method, inputs: calls.append(("nar", tuple(inputs[0].shape))) or run_nar(method, inputs)
    try:
        st._synthesize(torch.tensor([[100, 101, 102]]))
    finally:
        ar.run, nar.run = run_ar, run_nar
    k, d = c["frames_per_token"], p.config["llm"]["hidden_size"] // c["frames_per_token"]
    assert k == 2 and calls[0] == ("nar", (1, 3 * k, d))
    assert calls[1] == ("embed_codes", c["bos"])
    prefills = [x for x in calls if x[0] == "prefill"]
    assert prefills == [("prefill", (1, 3 * k + 1, d))]  # [bos, NAR output], one call
    assert calls[calls.index(prefills[0]) + 1] == ("embed_codes", c["sos"])
    old = {**p.config, "speech": {k_: v for k_, v in c.items() if k_ != "sos"}}
    p.config, saved = old, p.config
    try:
        with pytest.raises(ConfigError, match="rebuild it"):
            VitaCodecStream(p, 0)
    finally:
        p.config = saved
