// The steering playground: talks to the server's OpenAI-compatible endpoints only
// (GET /v1/models, GET /v1/vectors, POST /v1/chat/completions or /v1/completions with
// stream: true); the server validates every field. Text from the model is set with textContent,
// never parsed as HTML.
(function () {
  'use strict';
  var $ = function (id) { return document.getElementById(id); };
  var vectors = {};
  var controller = null;

  function headers() {
    var h = { 'Content-Type': 'application/json' };
    if ($('api_key').value) { h.Authorization = 'Bearer ' + $('api_key').value; }
    return h;
  }

  function showError(msg) { $('error').textContent = msg || ''; }

  function errorText(status, body) {
    var e = body && body.error;
    if (e && e.message) {
      return 'HTTP ' + status + ': ' + e.message + (e.param ? ' (' + e.param + ')' : '');
    }
    return 'HTTP ' + status;
  }

  function getJSON(path) {
    return fetch(path, { headers: headers() }).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (body) {
        if (!r.ok) { throw new Error(errorText(r.status, body)); }
        return body;
      });
    });
  }

  function fillLayers() {
    var box = $('layers');
    box.textContent = '';
    var v = vectors[$('vector').value];
    if (!v) { return; }
    box.appendChild(document.createTextNode('layers: '));
    (v.layers || []).forEach(function (layer, i) {
      var label = document.createElement('label');
      var input = document.createElement('input');
      input.type = 'checkbox';
      input.className = 'layer';
      input.value = String(layer);
      input.checked = i === Math.floor((v.layers.length - 1) / 2);
      label.appendChild(input);
      var norm = v.norms && v.norms[String(layer)];
      label.appendChild(document.createTextNode(' ' + layer));
      if (norm !== undefined) { label.title = 'vector norm ' + Number(norm).toFixed(3); }
      box.appendChild(label);
    });
  }

  var scaleShown = 'raw';

  function pushPerUnit() {  // {per: |vector| / residual norm, layer} at the first ticked layer
    var v = vectors[$('vector').value];
    var box = document.querySelector('#layers input.layer:checked');
    if (!v || !box || !v.norms || !v.residual_norms) { return null; }
    var norm = Number(v.norms[box.value]), resid = Number(v.residual_norms[box.value]);
    return norm > 0 && resid > 0 ? { per: norm / resid, layer: box.value } : null;
  }

  function setScale() {  // the same push in the other unit, and a note saying so
    var m = $('multiplier'), to = $('scale').value, old = Number(m.value);
    var unit = pushPerUnit(), note = '';
    if (to === 'residual') { m.min = -2; m.max = 2; m.step = 0.05; }
    else { m.min = -20; m.max = 20; m.step = 0.5; }
    if (to !== scaleShown && unit !== null) {
      var want = to === 'residual' ? old * unit.per : old / unit.per;
      m.value = String(want);  // the slider keeps it in its range, on its steps
      note = 'multiplier ' + old + ' (' + scaleShown + ') = ' + want.toPrecision(3) + ' (' + to +
        ') at layer ' + unit.layer + (Math.abs(Number(m.value) - want) > 1e-9 ? '; set to ' +
        m.value + ' (the ' + to + ' slider: ' + m.min + ' to ' + m.max + ' in steps of ' +
        m.step + ')' : '');
    } else if (to !== scaleShown) {
      note = 'multiplier ' + old + ' kept as it was: no vector norms to convert it with';
    }
    scaleShown = to;
    $('scale-note').textContent = note;
    $('multiplier-value').textContent = m.value;
  }

  function load() {
    getJSON('/v1/models').then(function (body) {
      var first = body && body.data && body.data[0];
      if (first) { $('model').textContent = first.id; $('model').dataset.id = first.id; }
    }).catch(function (e) { showError(String(e.message || e)); });
    getJSON('/v1/vectors').then(function (body) {
      (body.data || []).forEach(function (v) {
        vectors[v.id] = v;
        var o = document.createElement('option');
        o.value = v.id;
        o.textContent = v.id;
        $('vector').appendChild(o);
      });
      if (body.data && body.data.length) { $('vector').value = body.data[0].id; }
      fillLayers();
      if (body.probe) {
        $('probe').disabled = false;
        $('probe-label').textContent = 'probe read-out (layer ' + body.probe.layer +
          ', decision threshold ' + Number(body.probe.threshold || 0).toPrecision(4) + ')';
        $('probe-text').textContent = body.probe.text ? 'The probe was trained on ' +
          body.probe.text + '. It reads text of that form (a chat turn in the same template); ' +
          'other text can score on either side.' : '';
        $('key-positive').textContent = body.probe.positive || 'its positive class';
      }
    }).catch(function (e) { showError(String(e.message || e)); });
  }

  function request(steered) {
    var chat = document.querySelector('input[name=mode]:checked').value === 'chat';
    var body = {
      max_tokens: Number($('max_tokens').value), temperature: Number($('temperature').value),
      top_p: Number($('top_p').value), seed: Number($('seed').value), stream: true
    };
    if ($('model').dataset.id) { body.model = $('model').dataset.id; }
    if (chat) { body.messages = [{ role: 'user', content: $('prompt').value }]; }
    else { body.prompt = $('prompt').value; }
    if ($('probe').checked) { body.probe = true; }
    var name = $('vector').value;
    if (steered && name) {
      var picked = document.querySelectorAll('#layers input.layer:checked');
      var layers = Array.prototype.map.call(picked, function (x) { return Number(x.value); });
      body.steering = { vector: name, layers: layers, multiplier: Number($('multiplier').value),
        scale: $('scale').value, ablate: $('ablate').checked, positions: $('positions').value };
    }
    return { path: chat ? '/v1/chat/completions' : '/v1/completions', body: body, chat: chat };
  }

  // the report's heat-map colours alike (pages/html.py): red above the probe's threshold
  function colour(margin, scale) {
    var a = Math.min(1, Math.abs(margin) / (scale || 1));
    return margin >= 0 ? 'rgba(214, 39, 40, ' + (0.08 + 0.82 * a).toFixed(3) + ')'
                       : 'rgba(31, 119, 180, ' + (0.08 + 0.82 * a).toFixed(3) + ')';
  }

  function recolour() {  // one scale for every shown token: the largest |margin|
    var toks = document.querySelectorAll('#outputs .tok[data-margin]');
    var scale = 0;
    toks.forEach(function (t) { scale = Math.max(scale, Math.abs(Number(t.dataset.margin))); });
    toks.forEach(function (t) {
      t.style.backgroundColor = colour(Number(t.dataset.margin), scale);
    });
    $('probe-key').hidden = toks.length === 0;
    $('key-lo').textContent = (-(scale || 1)).toPrecision(3);
    $('key-hi').textContent = '+' + (scale || 1).toPrecision(3);
  }

  function addToken(panel, piece, scores, margins) {
    var span = document.createElement('span');
    span.className = 'tok';
    span.textContent = piece;
    if (scores && scores.length && margins && margins.length) {
      var s = scores[scores.length - 1], m = margins[margins.length - 1];
      span.dataset.score = String(s);
      span.dataset.margin = String(m);
      span.title = 'probe score ' + Number(s).toFixed(4) + ', margin ' + Number(m).toFixed(4);
    }
    panel.querySelector('.text').appendChild(span);
  }

  function handle(panel, req, obj) {
    if (obj.error) { throw new Error(errorText('stream', obj)); }
    var choice = obj.choices && obj.choices[0];
    if (!choice) { return; }
    var piece = req.chat ? (choice.delta && choice.delta.content) : choice.text;
    if (choice.probe_prompt_score !== undefined && choice.probe_prompt_score !== null) {
      panel.querySelector('.meta').textContent =
        'probe at the prompt\'s last token: margin ' +
        Number(choice.probe_prompt_margin).toFixed(4) + ', score ' +
        Number(choice.probe_prompt_score).toFixed(4);
    }
    if (piece) {
      addToken(panel, piece, choice.probe_scores, choice.probe_margins);
      recolour();
    }
  }

  function stream(panel, req, signal) {
    panel.dataset.state = 'running';
    panel.querySelector('.text').textContent = '';
    panel.querySelector('.meta').textContent = '';
    return fetch(req.path, { method: 'POST', headers: headers(), body: JSON.stringify(req.body),
      signal: signal }).then(function (r) {
      if (!r.ok) {
        return r.json().catch(function () { return null; }).then(function (body) {
          throw new Error(errorText(r.status, body));
        });
      }
      var reader = r.body.getReader(), decoder = new TextDecoder(), buffer = '';
      function next() {
        return reader.read().then(function (part) {
          buffer += decoder.decode(part.value || new Uint8Array(), { stream: !part.done });
          var events = buffer.split('\n\n');
          buffer = events.pop();
          for (var i = 0; i < events.length; i++) {
            var data = events[i].split('\n')
              .filter(function (l) { return l.indexOf('data:') === 0; })
              .map(function (l) { return l.slice(5).trim(); }).join('\n');
            if (!data) { continue; }
            if (data === '[DONE]') { return; }
            handle(panel, req, JSON.parse(data));
          }
          if (!part.done) { return next(); }
        });
      }
      return next();
    }).then(function () { panel.dataset.state = 'done'; }, function (e) {
      panel.dataset.state = 'error';
      throw e;
    });
  }

  function generate(ev) {
    ev.preventDefault();
    showError('');
    controller = new AbortController();
    $('generate').disabled = true;
    $('stop').disabled = false;
    var compare = $('compare').checked;
    $('out-plain').hidden = !compare;
    var first = request(true), steer = first.body.steering;
    $('out-steered').querySelector('h2').textContent = steer && steer.layers.length &&
      (steer.multiplier !== 0 || steer.ablate) ? 'steered: ' + steer.vector + ', layer' +
      (steer.layers.length > 1 ? 's ' : ' ') + steer.layers.join(', ') + ', ' +
      (steer.ablate ? 'ablated x ' : 'multiplier ') + steer.multiplier + ' (' + steer.scale +
      ')' : 'unsteered';
    $('probe-key').hidden = true;
    var jobs = [stream($('out-steered'), first, controller.signal)];
    if (compare) { jobs.push(stream($('out-plain'), request(false), controller.signal)); }
    Promise.all(jobs).catch(function (e) {
      if (e.name !== 'AbortError') { showError(String(e.message || e)); }
    }).then(function () {
      $('generate').disabled = false;
      $('stop').disabled = true;
    });
  }

  $('vector').addEventListener('change', fillLayers);
  $('scale').addEventListener('change', setScale);
  $('multiplier').addEventListener('input', function () {
    $('multiplier-value').textContent = $('multiplier').value;
  });
  $('controls').addEventListener('submit', generate);
  $('stop').addEventListener('click', function () { if (controller) { controller.abort(); } });
  setScale();
  load();
})();
