// The AudioWorklet of the page's Live mode: the microphone's float samples (the AudioContext
// runs at 24 kHz, so the browser has resampled them) to pcm16 chunks of 100 ms for live.js.
class Pcm16Chunker extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunk = new Int16Array(2400); // 100 ms at 24 kHz
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.chunk[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
        if (this.filled === this.chunk.length) {
          this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
          this.chunk = new Int16Array(2400);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("pcm16-chunker", Pcm16Chunker);
