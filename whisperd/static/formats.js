// Renders a WhisperX result (its JSON, decoded) as txt, srt, vtt, tsv or aud, byte for byte as
// whisperd/formats.py does with the CLI's default options. The page fetches a result only once
// (the server deletes the job's files after the first fetch), as JSON, and builds every other
// download here. tests/test_web.py checks these against the Python renderer.

const UNSPACED_LANGUAGES = ["ja", "zh"];
const DEFAULT_LINE_WIDTH = 1000;

// Python's round(): half to even on the exact float.
function pyRound(x) {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff === 0.5) return floor % 2 === 0 ? floor : floor + 1;
  return Math.round(x);
}

// str(float) as Python prints it: shortest round-trip digits, "12.0" for whole numbers,
// exponents below 1e-4 and from 1e16 on, written e-05 / e+16.
export function pyFloat(x) {
  if (!Number.isFinite(x)) return x > 0 ? "inf" : x < 0 ? "-inf" : "nan";
  const abs = Math.abs(x);
  if (abs !== 0 && (abs < 1e-4 || abs >= 1e16)) {
    const [mantissa, exponent] = x.toExponential().split("e");
    const sign = exponent[0] === "-" ? "-" : "+";
    const digits = exponent.replace(/^[+-]/, "").padStart(2, "0");
    return `${mantissa}e${sign}${digits}`;
  }
  if (Number.isInteger(x)) return (Object.is(x, -0) ? "-" : "") + abs.toFixed(0) + ".0";
  return String(x);
}

function length(text) {
  return [...text].length; // code points, as Python's len()
}

function strip(text) {
  return text.replace(/^\s+|\s+$/gu, "");
}

export function formatTimestamp(seconds, marker = ".", alwaysHours = false) {
  if (seconds < 0) throw new Error(`negative timestamp ${seconds}`);
  const totalMs = pyRound(seconds * 1000.0);
  const hours = Math.floor(totalMs / 3600000);
  let rest = totalMs % 3600000;
  const minutes = Math.floor(rest / 60000);
  rest %= 60000;
  const wholeSeconds = Math.floor(rest / 1000);
  const ms = rest % 1000;
  const two = (n) => String(n).padStart(2, "0");
  const prefix = alwaysHours || hours > 0 ? `${two(hours)}:` : "";
  return `${prefix}${two(minutes)}:${two(wholeSeconds)}${marker}${String(ms).padStart(3, "0")}`;
}

function speakerLabel(value) {
  return value === null ? "None" : String(value); // Python's f"{None}"
}

function txt(result) {
  return result.segments.map((s) => {
    const text = strip(s.text);
    return (s.speaker == null ? text : `[${s.speaker}]: ${text}`) + "\n";
  }).join("");
}

function tsv(result) {
  return "start\tend\ttext\n" + result.segments.map((s) =>
    `${pyRound(1000 * s.start)}\t${pyRound(1000 * s.end)}\t${strip(s.text).replaceAll("\t", " ")}\n`).join("");
}

function aud(result) {
  return result.segments.map((s) => {
    const label = s.speaker == null ? "" : `[[${s.speaker}]]`;
    return `${pyFloat(s.start)}\t${pyFloat(s.end)}\t${label}${strip(s.text).replaceAll("\t", " ")}\n`;
  }).join("");
}

// Aligned words into cues: with the default options, one cue per segment, a line wrapped
// only past DEFAULT_LINE_WIDTH characters. Returns [words, first segment] pairs.
function wordGroups(segments) {
  const groups = [];
  let group = [];
  let first = null;
  let lineLength = 0;
  for (const segment of segments) {
    (segment.words || []).forEach((original, index) => {
      const word = { ...original };
      const fits = lineLength + length(word.word) <= DEFAULT_LINE_WIDTH;
      const segmentBreak = index === 0 && group.length > 0;
      if (lineLength > 0 && fits && !segmentBreak) {
        lineLength += length(word.word);
      } else {
        word.word = strip(word.word);
        if (segmentBreak) {
          groups.push([group, first]);
          group = [];
        } else if (lineLength > 0) {
          word.word = "\n" + word.word;
        }
        lineLength = length(strip(word.word));
      }
      if (group.length === 0) first = segment;
      group.push(word);
    });
  }
  if (group.length) groups.push([group, first]);
  return groups;
}

function* cues(result, marker, alwaysHours) {
  const segments = result.segments;
  if (!segments.length) return;
  const stamp = (seconds) => formatTimestamp(seconds, marker, alwaysHours);
  if (!("words" in segments[0])) {
    for (const segment of segments) {
      let text = strip(segment.text).replaceAll("-->", "->");
      if ("speaker" in segment) text = `[${speakerLabel(segment.speaker)}]: ${text}`;
      yield [stamp(segment.start), stamp(segment.end), text];
    }
    return;
  }
  const joiner = UNSPACED_LANGUAGES.includes(result.language) ? "" : " ";
  for (const [words, first] of wordGroups(segments)) {
    const starts = words.filter((w) => "start" in w).map((w) => w.start);
    const ends = words.filter((w) => "end" in w).map((w) => w.end);
    const [cueStart, cueEnd] = starts.length && ends.length
      ? [stamp(Math.min(...starts)), stamp(Math.max(...ends))]
      : [stamp(first.start), stamp(first.end)];
    const prefix = first.speaker == null ? "" : `[${first.speaker}]: `;
    yield [cueStart, cueEnd, prefix + words.map((w) => w.word).join(joiner)];
  }
}

export const FORMATS = ["txt", "srt", "vtt", "tsv", "json", "aud"];
export const MIME_TYPES = {
  txt: "text/plain", srt: "application/x-subrip", vtt: "text/vtt",
  tsv: "text/tab-separated-values", json: "application/json", aud: "text/plain",
};

// `json` must be the server's own JSON text: re-serialising in JavaScript would change the
// numbers (12.0 becomes 12) and the spacing.
export function render(result, format, json) {
  switch (format) {
    case "txt": return txt(result);
    case "tsv": return tsv(result);
    case "aud": return aud(result);
    case "json": return json;
    case "vtt":
      return "WEBVTT\n\n" + [...cues(result, ".", false)].map(([a, b, t]) => `${a} --> ${b}\n${t}\n\n`).join("");
    case "srt":
      return [...cues(result, ",", true)].map(([a, b, t], i) => `${i + 1}\n${a} --> ${b}\n${t}\n\n`).join("");
    default: throw new Error(`unknown format ${format}`);
  }
}
