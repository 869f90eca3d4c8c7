// The page's Live mode: the microphone, through an AudioWorklet, as pcm16 at 24 kHz over
// /v1/realtime (OpenAI's Realtime transcription protocol; the token goes in the subprotocol,
// since a browser cannot set headers on a WebSocket). Captions appear as deltas arrive; each
// finished utterance is kept; the lag the server reports is shown. See docs/realtime.md.
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "whisperd.token";
const RATE = 24000;

const live = { ws: null, context: null, stream: null, node: null, items: new Map(), sentSeconds: 0 };

function setState(text) {
  $("live-state").textContent = text;
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function captionFor(itemId) {
  let line = live.items.get(itemId);
  if (!line) {
    line = document.createElement("li");
    line.className = "live-line partial";
    line.dataset.item = itemId;
    $("live-captions").append(line);
    live.items.set(itemId, line);
  }
  return line;
}

function onEvent(event) {
  switch (event.type) {
    case "session.created":
      setState("Listening…");
      break;
    case "input_audio_buffer.speech_started":
      captionFor(event.item_id);
      break;
    case "conversation.item.input_audio_transcription.delta":
      captionFor(event.item_id).textContent += event.delta;
      break;
    case "conversation.item.input_audio_transcription.completed": {
      const line = captionFor(event.item_id);
      line.textContent = event.transcript; // replaces the provisional deltas
      line.className = "live-line done";
      if (!event.transcript) line.remove();
      break;
    }
    case "conversation.item.input_audio_transcription.failed":
      captionFor(event.item_id).className = "live-line failed";
      break;
    case "whisperd.session.lag": {
      const lag = event.lag_seconds;
      $("live-lag").textContent = `${lag.toFixed(1)} s`;
      $("live-lag").className = lag > 5 ? "lag bad" : lag > 2 ? "lag slow" : "lag ok";
      break;
    }
    case "error":
      setState(`Server: ${event.error.message}`);
      break;
    default:
      break;
  }
}

async function start() {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  $("live-start").disabled = true;
  setState("Asking for the microphone…");
  try {
    live.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  } catch (error) {
    setState(`No microphone: ${error.message}`);
    $("live-start").disabled = false;
    return;
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const protocols = ["realtime"].concat(token ? [`openai-insecure-api-key.${token}`] : []);
  const ws = new WebSocket(`${scheme}//${location.host}/v1/realtime?intent=transcription`, protocols);
  live.ws = ws;
  ws.onmessage = (message) => onEvent(JSON.parse(message.data));
  ws.onclose = (close) => {
    if (live.ws === ws) stopAudio();
    setState(close.code === 1000 || close.code === 1005 ? "Stopped." : `Closed by the server (${close.code}${close.reason ? ": " + close.reason : ""}).`);
  };
  ws.onerror = () => setState("Could not connect (is the token right?).");
  await new Promise((resolve, reject) => {
    ws.addEventListener("open", resolve, { once: true });
    ws.addEventListener("close", reject, { once: true });
  }).catch(() => null);
  if (ws.readyState !== WebSocket.OPEN) {
    $("live-start").disabled = false;
    return;
  }
  ws.send(JSON.stringify({ type: "session.update", session: { type: "transcription", audio: { input: {
    format: { type: "audio/pcm", rate: RATE },
    transcription: { model: "whisper-1", language: $("language") && $("language").value !== "auto" ? $("language").value || null : null },
    turn_detection: { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 600 },
  } } } }));
  live.context = new AudioContext({ sampleRate: RATE });
  await live.context.audioWorklet.addModule("/static/live-worklet.js");
  const source = live.context.createMediaStreamSource(live.stream);
  live.node = new AudioWorkletNode(live.context, "pcm16-chunker");
  live.node.port.onmessage = (message) => {
    if (ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(message.data) }));
      live.sentSeconds += message.data.byteLength / 2 / RATE;
    }
  };
  source.connect(live.node);
  $("live-stop").disabled = false;
}

function stopAudio() {
  if (live.node) live.node.disconnect();
  if (live.context) live.context.close();
  if (live.stream) live.stream.getTracks().forEach((track) => track.stop());
  live.node = live.context = live.stream = null;
  $("live-start").disabled = false;
  $("live-stop").disabled = true;
}

function stop() {
  const ws = live.ws;
  stopAudio();
  if (ws && ws.readyState === WebSocket.OPEN) {
    // Whatever is still being said becomes a finished utterance before the session ends.
    ws.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
    setState("Finishing…");
    setTimeout(() => ws.close(1000), 3000);
  }
}

$("live-start").addEventListener("click", start);
$("live-stop").addEventListener("click", stop);
