// digitserve's page: draw a digit, see the prediction and why, watch the service.
// Plain modern JavaScript, no dependencies; it calls the same endpoints a client would.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const methodRadios = () => [...document.querySelectorAll('input[name="method"]')];

  const PEN_WIDTH = 20;           // px on the 280 px pad: about an MNIST stroke once the digit is fitted to 20x20
  const DRAW_EVERY_MS = 250;      // while drawing, at most one /predict this often (and one in flight)
  const METRICS_EVERY_MS = 3000;  // /metrics poll
  const INFO_EVERY_MS = 15000;    // /info poll: a newly served or loaded version shows up
  const TOP_UNITS = 5;
  const SPARK_POINTS = 40;
  const INFERENCE = new Set(['predict', 'explain', 'v1_predict', 'v1_explain', 'v2_infer']);

  const state = {
    key: null,         // the API key: only in this tab's memory, never stored
    pin: '',           // a version to pin /predict and /explain to ('' = the served one)
    upload: null,      // the uploaded or dropped file, while the pad shows it
    ink: false,        // something to classify on the pad
    method: methodRadios().find((radio) => radio.checked).value,  // the page's buttons list service.work's methods
    generation: 0,     // bumped by Clear and by a new upload: answers for an older generation are dropped
    lastSource: null,  // what the last final prediction was computed on (the method switch explains it again)
    drawing: null,     // {id, x, y} of the pointer drawing now
  };

  // ---------------------------------------------------------------- calls

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
      this.detail = detail;
    }
  }

  async function call(path, init = {}) {
    const headers = new Headers(init.headers || {});
    if (state.key) headers.set('X-API-Key', state.key);
    let response;
    try {
      response = await fetch(path, { ...init, headers, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      throw new ApiError(0, `the service did not answer (${e.message})`);
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    if (!response.ok) {
      const detail = body && typeof body.detail === 'string' ? body.detail
        : body && typeof body.error === 'string' ? body.error
          : `${response.status} ${response.statusText || 'error'}`;
      throw new ApiError(response.status, detail);
    }
    if (body === null || typeof body !== 'object') throw new ApiError(response.status, `${path} did not answer JSON`);
    return body;
  }

  const pinned = (path) => (state.pin ? `${path}?version=${encodeURIComponent(state.pin)}` : path);

  function form(source, fields = {}) {
    const data = new FormData();
    data.append('file', source.blob, source.name);
    for (const [name, value] of Object.entries(fields)) data.append(name, String(value));
    return data;
  }

  // ---------------------------------------------------------------- errors and the key

  let keyAsked = false;

  // The page sends one picture per call: the API's "instance 0: " names nothing a person sees.
  const forPeople = (detail) => {
    const text = detail.replace(/^instance \d+: /, '');
    return text.charAt(0).toUpperCase() + text.slice(1);
  };

  function showError(err) {
    const box = $('error');
    box.textContent = err instanceof ApiError ? forPeople(err.detail) : String(err && err.message ? err.message : err);
    box.dataset.status = err instanceof ApiError ? String(err.status) : '';
    box.hidden = false;
    if (err instanceof ApiError && err.status === 401) askForKey();
  }

  function clearError() {
    const box = $('error');
    box.hidden = true;
    box.textContent = '';
    delete box.dataset.status;
  }

  function askForKey() {
    const keyForm = $('key-form');
    keyForm.hidden = false;
    if (!keyAsked) {
      keyAsked = true;
      $('api-key').focus();
    }
  }

  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    state.key = $('api-key').value.trim() || null;
    if (state.ink) predict(true);  // ask again with the key
    else clearError();
  });

  // ---------------------------------------------------------------- the pad

  const pad = $('pad');
  const ink = pad.getContext('2d');

  function blankPad() {
    ink.save();
    ink.setTransform(1, 0, 0, 1, 0, 0);
    ink.fillStyle = '#fff';
    ink.fillRect(0, 0, pad.width, pad.height);
    ink.restore();
    state.ink = false;
    state.upload = null;
  }

  function at(e) {  // a pointer event's position in the pad's own pixels
    const rect = pad.getBoundingClientRect();
    return {
      x: (e.clientX - rect.left - pad.clientLeft) * pad.width / pad.clientWidth,
      y: (e.clientY - rect.top - pad.clientTop) * pad.height / pad.clientHeight,
    };
  }

  function dot(p) {
    ink.fillStyle = '#000';
    ink.beginPath();
    ink.arc(p.x, p.y, PEN_WIDTH / 2, 0, 2 * Math.PI);
    ink.fill();
  }

  function line(from, to) {
    ink.strokeStyle = '#000';
    ink.lineWidth = PEN_WIDTH;
    ink.lineCap = 'round';
    ink.lineJoin = 'round';
    ink.beginPath();
    ink.moveTo(from.x, from.y);
    ink.lineTo(to.x, to.y);
    ink.stroke();
  }

  pad.addEventListener('pointerdown', (e) => {
    if (state.drawing || (e.pointerType === 'mouse' && e.button !== 0)) return;
    e.preventDefault();
    if (state.upload) {  // drawing after an upload starts a new drawing
      state.generation += 1;
      blankPad();
    }
    pad.setPointerCapture(e.pointerId);
    const p = at(e);
    state.drawing = { id: e.pointerId, ...p };
    dot(p);
    changed();
  });

  pad.addEventListener('pointermove', (e) => {
    const pen = state.drawing;
    if (!pen || e.pointerId !== pen.id) return;
    const events = typeof e.getCoalescedEvents === 'function' ? e.getCoalescedEvents() : [];
    for (const event of events.length ? events : [e]) {
      const p = at(event);
      line(pen, p);
      pen.x = p.x;
      pen.y = p.y;
    }
    changed();
  });

  function penUp(e) {
    if (!state.drawing || e.pointerId !== state.drawing.id) return;
    state.drawing = null;
    settle();
  }
  pad.addEventListener('pointerup', penUp);
  pad.addEventListener('pointercancel', penUp);
  pad.addEventListener('lostpointercapture', penUp);

  $('clear').addEventListener('click', () => {
    state.generation += 1;
    clearTimeout(predictor.timer);
    predictor.timer = null;
    predictor.again = false;
    blankPad();
    state.lastSource = null;
    showNoPrediction();
    showNoExplanation();
    clearError();
    busy('result', false);
  });

  $('predict').addEventListener('click', () => predict(true));

  // ---------------------------------------------------------------- upload and drop

  async function useFile(file) {
    if (!file) return;
    state.generation += 1;
    blankPad();
    state.upload = file;
    state.ink = true;
    try {  // show it on the pad; a file the browser cannot decode still goes to the service, which says why
      const picture = await createImageBitmap(file);
      const scale = Math.min(pad.width / picture.width, pad.height / picture.height);
      const w = picture.width * scale;
      const h = picture.height * scale;
      ink.imageSmoothingEnabled = scale < 2;
      ink.drawImage(picture, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
      ink.imageSmoothingEnabled = true;
      picture.close();
    } catch {
      // nothing to preview
    }
    predict(true);
  }

  $('file').addEventListener('change', (e) => {
    const [file] = e.target.files;
    useFile(file);
    e.target.value = '';  // the same file again is a change too
  });

  const drop = $('drop');
  const isFileDrag = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes('Files');
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      if (isFileDrag(e)) drop.classList.add('dragging');
    });
  }
  drop.addEventListener('dragleave', () => drop.classList.remove('dragging'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('dragging');
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) useFile(file);
  });
  // a picture dropped beside the pad must not replace the page
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());

  // ---------------------------------------------------------------- predict

  const predictor = { timer: null, running: false, again: false, againFinal: false };

  function busy(id, on) {
    $(id).setAttribute('aria-busy', on ? 'true' : 'false');
  }

  function changed() {  // the drawing changed: a prediction soon (throttled, not only when the pen rests)
    state.ink = true;
    busy('result', true);
    if (predictor.timer === null) {
      predictor.timer = setTimeout(() => {
        predictor.timer = null;
        predict(false);
      }, DRAW_EVERY_MS);
    }
  }

  function settle() {  // the pen is up: predict now, then explain
    clearTimeout(predictor.timer);
    predictor.timer = null;
    predict(true);
  }

  async function currentSource() {
    if (state.upload) return { blob: state.upload, name: state.upload.name || 'picture' };
    const blob = await new Promise((resolve) => pad.toBlob(resolve, 'image/png'));
    return { blob, name: 'pad.png' };
  }

  async function predict(final) {
    busy('result', true);
    if (predictor.running) {  // one in flight: ask again when it is answered
      predictor.again = true;
      predictor.againFinal = predictor.againFinal || final;
      return;
    }
    predictor.running = true;
    const generation = state.generation;
    try {
      const source = await currentSource();
      try {
        const answer = await call(pinned('/predict'), { method: 'POST', body: form(source) });
        const [prediction] = answer.predictions || [];
        if (!prediction) throw new ApiError(200, '/predict answered no prediction');
        if (generation === state.generation) {
          showPrediction(prediction, answer.model || {});
          clearError();
          if (final && flagged(prediction, 'no_digit')) {
            state.lastSource = null;  // nothing to explain
            showNoExplanation();
          } else if (final && !predictor.again) {
            state.lastSource = source;
            explain(source);
          }
        }
      } catch (err) {
        if (generation === state.generation) {
          showNoPrediction();
          if (final) showNoExplanation();
          showError(err);
        }
      }
    } finally {
      predictor.running = false;
      if (predictor.again) {
        const again = predictor.againFinal;
        predictor.again = false;
        predictor.againFinal = false;
        predict(again);
      } else if (!state.drawing && predictor.timer === null) {
        busy('result', false);
      }
    }
  }

  const percent = (p) => (p > 0 && p < 0.001 ? '<0.1%' : `${(100 * p).toFixed(1)}%`);

  function buildBars() {
    const list = $('probabilities');
    list.replaceChildren();
    for (let digit = 0; digit < 10; digit += 1) {
      const item = document.createElement('li');
      const name = document.createElement('span');
      name.className = 'digit';
      name.textContent = String(digit);
      const track = document.createElement('span');
      track.className = 'track';
      const fill = document.createElement('span');
      fill.className = 'fill';
      track.append(fill);
      const value = document.createElement('span');
      value.className = 'value';
      item.append(name, track, value);
      list.append(item);
    }
  }

  const flagged = (p, flag) => Array.isArray(p.flags) && p.flags.includes(flag);

  function showVerdict(p) {  // no digit found, or one that does not look like a digit; and the typicality
    const verdict = $('verdict');
    const text = flagged(p, 'no_digit') ? 'No digit found in this picture.'
      : flagged(p, 'not_a_digit') ? 'This does not look like a digit.' : '';
    verdict.textContent = text;
    verdict.hidden = !text;
    verdict.dataset.flag = flagged(p, 'no_digit') ? 'no_digit' : flagged(p, 'not_a_digit') ? 'not_a_digit' : '';
    const typical = typeof p.typicality === 'number' && !flagged(p, 'no_digit');
    $('typicality').textContent = typical ? `typicality ${percent(p.typicality)}` : '';
  }

  function showPrediction(p, model) {
    $('result').removeAttribute('data-empty');
    showVerdict(p);
    $('label').textContent = p.label === null || p.label === undefined ? '–' : String(p.label);
    $('confidence').textContent = typeof p.confidence === 'number' ? percent(p.confidence) : '';
    const probabilities = Array.isArray(p.probabilities) ? p.probabilities : [];
    Array.from($('probabilities').children).forEach((item, digit) => {
      const value = Number(probabilities[digit] || 0);
      item.querySelector('.fill').style.width = `${(100 * value).toFixed(2)}%`;
      item.querySelector('.value').textContent = percent(value);
      item.classList.toggle('top', digit === p.label);
    });
    $('answered').textContent = model.name ? `answered by ${model.name} version ${model.version}` : '';
    $('result').dataset.version = model.version === undefined ? '' : String(model.version);
  }

  function showNoPrediction() {
    $('result').setAttribute('data-empty', '');
    showVerdict({});
    $('label').textContent = '–';
    $('confidence').textContent = '';
    $('answered').textContent = '';
    delete $('result').dataset.version;
    for (const item of $('probabilities').children) {
      item.querySelector('.fill').style.width = '0';
      item.querySelector('.value').textContent = '';
      item.classList.remove('top');
    }
  }

  // ---------------------------------------------------------------- explain

  const explainer = { seq: 0 };
  const heatmap = $('heatmap');
  const seen = $('seen');

  async function explain(source) {
    explainer.seq += 1;
    const seq = explainer.seq;
    const generation = state.generation;
    busy('why', true);
    try {
      const answer = await call(pinned('/explain'), {
        method: 'POST', body: form(source, { method: state.method, top_k: TOP_UNITS }),
      });
      const [report] = answer.predictions || [];
      if (!report) throw new ApiError(200, '/explain answered no explanation');
      if (seq === explainer.seq && generation === state.generation) showExplanation(report);
    } catch (err) {
      if (seq === explainer.seq && generation === state.generation) {
        showNoExplanation();
        showError(err);
      }
    } finally {
      if (seq === explainer.seq) busy('why', false);
    }
  }

  function grid28(rows) {  // a 28x28 array of numbers, or null
    if (!Array.isArray(rows) || rows.length !== 28) return null;
    return rows.every((row) => Array.isArray(row) && row.length === 28) ? rows : null;
  }

  function paint(canvas, pixel) {  // pixel(x, y) -> [r, g, b], 28x28 cells scaled up to the canvas
    const small = document.createElement('canvas');
    small.width = 28;
    small.height = 28;
    const cells = small.getContext('2d');
    const image = cells.createImageData(28, 28);
    for (let y = 0; y < 28; y += 1) {
      for (let x = 0; x < 28; x += 1) {
        const [r, g, b] = pixel(x, y);
        const i = 4 * (28 * y + x);
        image.data[i] = r;
        image.data[i + 1] = g;
        image.data[i + 2] = b;
        image.data[i + 3] = 255;
      }
    }
    cells.putImageData(image, 0, 0);
    const out = canvas.getContext('2d');
    out.imageSmoothingEnabled = false;
    out.clearRect(0, 0, canvas.width, canvas.height);
    out.drawImage(small, 0, 0, canvas.width, canvas.height);
  }

  const POSITIVE = [214, 39, 40];
  const NEGATIVE = [31, 99, 214];

  function showExplanation(report) {
    const input = grid28(report.input);
    const attributions = grid28(report.attributions);
    if (!input || !attributions) throw new ApiError(200, '/explain answered no 28x28 input and attributions');
    $('why').removeAttribute('data-empty');
    paint(seen, (x, y) => {
      const v = Math.round(255 * Math.min(1, Math.max(0, input[y][x])));
      return [v, v, v];
    });
    let largest = 0;
    for (const row of attributions) for (const a of row) largest = Math.max(largest, Math.abs(a));
    paint(heatmap, (x, y) => {
      const base = 70 * Math.min(1, Math.max(0, input[y][x]));  // the input, dim, under the colours
      const a = largest > 0 ? attributions[y][x] / largest : 0;
      const strength = Math.sqrt(Math.abs(a));
      const colour = a >= 0 ? POSITIVE : NEGATIVE;
      return colour.map((c) => Math.round(base * (1 - strength) + c * strength));
    });
    heatmap.dataset.method = report.method || state.method;
    heatmap.dataset.target = String(report.target);
    const radio = methodRadios().find((r) => r.value === report.method);
    const name = radio ? radio.parentElement.textContent.trim().toLowerCase() : report.method;
    heatmap.setAttribute('aria-label', `Attribution heatmap (${name}) for digit ${report.target}`);
    showUnits(report.layers || []);
  }

  function showUnits(layers) {
    const list = $('units');
    list.replaceChildren();
    const layer = layers.find((l) => Array.isArray(l.top_units) && l.top_units.length);
    if (!layer) return;
    const units = layer.top_units.slice(0, TOP_UNITS);
    const largest = Math.max(...units.map((u) => Math.abs(u.contribution)), 1e-12);
    for (const unit of units) {
      const item = document.createElement('li');
      item.dataset.unit = String(unit.unit);
      const name = document.createElement('span');
      name.textContent = `unit ${unit.unit}`;
      const track = document.createElement('span');
      track.className = 'track';
      const fill = document.createElement('span');
      fill.className = 'fill';
      fill.style.width = `${(100 * Math.abs(unit.contribution) / largest).toFixed(1)}%`;
      track.append(fill);
      const value = document.createElement('span');
      value.className = 'value';
      value.textContent = `${unit.contribution >= 0 ? '+' : ''}${Number(unit.contribution).toFixed(2)}`;
      value.title = `activation ${Number(unit.activation).toFixed(2)} × outgoing weight`;
      item.append(name, track, value);
      list.append(item);
    }
  }

  function showNoExplanation() {
    $('why').setAttribute('data-empty', '');
    explainer.seq += 1;
    busy('why', false);
    for (const canvas of [heatmap, seen]) canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
    delete heatmap.dataset.method;
    delete heatmap.dataset.target;
    heatmap.setAttribute('aria-label', 'Attribution heatmap');
    $('units').replaceChildren();
  }

  for (const radio of methodRadios()) {
    radio.addEventListener('change', () => {
      if (!radio.checked) return;
      state.method = radio.value;
      if (state.lastSource) explain(state.lastSource);
    });
  }

  // ---------------------------------------------------------------- which model

  async function loadInfo(first) {
    if (!first && document.hidden) return;
    try {
      showInfo(await call('/info'));
    } catch (err) {
      if (first) showError(err);
    }
  }

  function showInfo(info) {
    const model = info.model || {};
    $('model-name').textContent = model.name || '–';
    $('version').textContent = model.version === undefined ? '–' : String(model.version);
    $('accuracy').textContent = typeof model.test_accuracy === 'number'
      ? `${(100 * model.test_accuracy).toFixed(2)}%` : 'not recorded';
    $('device').textContent = (info.serving && info.serving.device) || '–';
    showVersions(info.versions, model.version);
  }

  function showVersions(versions, served) {
    const loaded = versions && Array.isArray(versions.loaded)
      ? versions.loaded.map(Number).sort((a, b) => a - b).map(String) : [];  // in version order, as a picker reads
    const row = $('pin-row');
    const select = $('pin');
    if (loaded.length < 2) {
      row.hidden = true;
      if (state.pin) {
        state.pin = '';
        select.value = '';
      }
      return;
    }
    const serving = versions.serving ?? served;
    const canary = versions.canary && typeof versions.canary === 'object' ? versions.canary.version : versions.canary;
    const options = [['', `the served one (version ${serving})`]];
    for (const v of loaded) {
      const notes = [String(v) === String(serving) ? 'served' : '', String(v) === String(canary) ? 'canary' : ''].filter(Boolean);
      options.push([v, `version ${v}${notes.length ? ` (${notes.join(', ')})` : ''}`]);
    }
    const keep = loaded.includes(state.pin) ? state.pin : '';
    select.replaceChildren(...options.map(([value, text]) => new Option(text, value, false, value === keep)));
    select.value = keep;
    if (keep !== state.pin) state.pin = keep;
    row.hidden = false;
  }

  $('pin').addEventListener('change', (e) => {
    state.pin = e.target.value;
    if (state.ink) predict(true);
  });

  // ---------------------------------------------------------------- service at a glance

  const SAMPLE = /^([A-Za-z_:][\w:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)/;
  const LABEL = /(\w+)="((?:[^"\\]|\\.)*)"/g;
  const WINDOW_MS = 30000;  // the panel's figures are over this long (or since the page opened)
  const glance = { history: [], series: { rate: [], p50: [], p99: [], batch: [], errors: [] } };

  function snapshot(text) {  // the counters the panel needs, summed over labels
    const snap = { requests: 0, client: 0, server: 0, buckets: new Map(), batchSum: 0, batchCount: 0 };
    for (const lineText of text.split('\n')) {
      if (!lineText || lineText[0] === '#') continue;
      const m = SAMPLE.exec(lineText);
      if (!m) continue;
      const [, name, rawLabels, rawValue] = m;
      if (!name.startsWith('digitserve_')) continue;
      const labels = {};
      for (const [, key, value] of (rawLabels || '').matchAll(LABEL)) labels[key] = value;
      const value = Number(rawValue);
      if (!Number.isFinite(value)) continue;
      if (name === 'digitserve_requests_total' && INFERENCE.has(labels.endpoint)) {
        snap.requests += value;
        const status = Number(labels.status);
        if (status >= 500) snap.server += value;
        else if (status >= 400) snap.client += value;
      } else if (name === 'digitserve_request_duration_seconds_bucket' && INFERENCE.has(labels.endpoint)) {
        const le = labels.le === '+Inf' ? Infinity : Number(labels.le);
        snap.buckets.set(le, (snap.buckets.get(le) || 0) + value);
      } else if (name === 'digitserve_batch_size_sum') {
        snap.batchSum += value;
      } else if (name === 'digitserve_batch_size_count') {
        snap.batchCount += value;
      }
    }
    return snap;
  }

  const grown = (now, before) => (now >= before ? now - before : now);  // a restart resets counters to zero

  function quantile(q, buckets) {  // Prometheus' histogram_quantile over [[le, cumulative count], ...]
    if (!buckets.length) return null;
    const total = buckets[buckets.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    for (let i = 0; i < buckets.length; i += 1) {
      const [upper, count] = buckets[i];
      if (count >= rank) {
        const lower = i > 0 ? buckets[i - 1][0] : 0;
        if (upper === Infinity) return lower;
        const below = i > 0 ? buckets[i - 1][1] : 0;
        return lower + (upper - lower) * (count > below ? (rank - below) / (count - below) : 1);
      }
    }
    return null;
  }

  function seconds(s) {
    if (s === null) return '–';
    const ms = 1000 * s;
    return `${ms < 1 ? ms.toFixed(2) : ms < 10 ? ms.toFixed(1) : ms.toFixed(0)} ms`;
  }

  function record(previous, snap, dt) {
    const requests = grown(snap.requests, previous.requests);
    const buckets = [...snap.buckets.entries()].sort((a, b) => a[0] - b[0])
      .map(([le, count]) => [le, grown(count, previous.buckets.get(le) || 0)]);
    const batches = grown(snap.batchCount, previous.batchCount);
    const values = {
      rate: requests / dt,
      p50: quantile(0.5, buckets),
      p99: quantile(0.99, buckets),
      batch: batches > 0 ? grown(snap.batchSum, previous.batchSum) / batches : null,
      errors: requests > 0 ? grown(snap.server, previous.server) / requests : null,
    };
    const client = requests > 0 ? grown(snap.client, previous.client) / requests : null;
    $('m-rate').textContent = `${values.rate.toFixed(values.rate < 10 ? 1 : 0)}/s`;
    $('m-p50').textContent = seconds(values.p50);
    $('m-p99').textContent = seconds(values.p99);
    $('m-batch').textContent = values.batch === null ? '–' : values.batch.toFixed(1);
    $('m-errors').textContent = values.errors === null ? '–' : `${(100 * values.errors).toFixed(1)}%`;
    $('m-4xx').textContent = client === null ? '' : `4xx: ${(100 * client).toFixed(1)}%`;
    for (const [name, value] of Object.entries(values)) {
      const series = glance.series[name];
      series.push(value);
      if (series.length > SPARK_POINTS) series.shift();
      sparkline($(`s-${name}`), series);
    }
    $('glance').dataset.samples = String(glance.series.rate.length);
  }

  function sparkline(canvas, series) {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const g = canvas.getContext('2d');
    g.clearRect(0, 0, width, height);
    const known = series.filter((v) => v !== null);
    if (!known.length) return;
    const top = Math.max(...known) || 1;
    const offset = SPARK_POINTS - series.length;
    const step = (width - 4 * ratio) / (SPARK_POINTS - 1);
    const xAt = (i) => 2 * ratio + (offset + i) * step;
    const yAt = (v) => height - 2 * ratio - (height - 4 * ratio) * (v / top);
    g.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue('--accent').trim() || '#2563eb';
    g.lineWidth = 1.5 * ratio;
    g.beginPath();
    let pen = false;
    series.forEach((v, i) => {
      if (v === null) {
        pen = false;
        return;
      }
      if (pen) g.lineTo(xAt(i), yAt(v));
      else g.moveTo(xAt(i), yAt(v));
      pen = true;
    });
    g.stroke();
    g.fillStyle = g.strokeStyle;  // points with no neighbour (the first, or after a gap) as dots
    series.forEach((v, i) => {
      if (v === null || (series[i - 1] ?? null) !== null || (series[i + 1] ?? null) !== null) return;
      g.beginPath();
      g.arc(xAt(i), yAt(v), 1.5 * ratio, 0, 2 * Math.PI);
      g.fill();
    });
  }

  async function pollMetrics() {
    if (!document.hidden) {
      try {
        const response = await fetch('/metrics', { cache: 'no-store', credentials: 'omit' });
        if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
        const snap = snapshot(await response.text());
        const now = performance.now();
        const history = glance.history;
        while (history.length > 1 && now - history[1].at >= WINDOW_MS) history.shift();
        if (history.length) record(history[0].snap, snap, (now - history[0].at) / 1000);
        history.push({ snap, at: now });
        $('m-status').textContent = '';
      } catch (err) {
        $('m-status').textContent = `metrics unavailable: ${err.message}`;
      }
    }
    setTimeout(pollMetrics, METRICS_EVERY_MS);
  }

  // ---------------------------------------------------------------- start

  blankPad();
  buildBars();
  showNoPrediction();
  loadInfo(true);
  setInterval(() => loadInfo(false), INFO_EVERY_MS);
  pollMetrics();
})();
