(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var config = JSON.parse(document.getElementById("config").textContent);

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svgEl(tag, attrs) {
    var node = document.createElementNS(NS, tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    return node;
  }
  function num(v, digits) {
    if (v === null || v === undefined) return "\u2013";
    if (Number.isInteger(v)) return v.toLocaleString("en");
    if (Math.abs(v) < 1e-3) return Number(v).toExponential(1);
    return Number(v).toFixed(digits === undefined ? 4 : digits);
  }
  function when(t) {
    return new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }
  function championText(view) {
    if (view.champion) return view.champion.model + " v" + view.champion.version;
    for (var i = 0; i < view.candidates.length; i++) {
      var c = view.candidates[i];
      if (c.role === "champion") return c.name + " v" + c.version;
    }
    return "none yet";
  }
  function table(headers, rows) {
    var t = el("table"), head = el("tr");
    headers.forEach(function (h, i) { head.appendChild(el("th", i ? {} : {class: "text"}, h)); });
    t.appendChild(head);
    rows.forEach(function (r) { t.appendChild(r); });
    return t;
  }
  function row(cells, attrs) {
    var tr = el("tr", attrs);
    cells.forEach(function (c, i) {
      if (c instanceof Node) { var td = el("td", i ? {} : {class: "text"}); td.appendChild(c);
        tr.appendChild(td); }
      else tr.appendChild(el("td", i ? {} : {class: "text"}, c));
    });
    return tr;
  }
  function candidateColours(view) {
    var names = Object.keys(view.series);
    view.candidates.forEach(function (c) { if (names.indexOf(c.name) < 0) names.push(c.name); });
    var colours = {};
    var palette = config.candidates;
    names.forEach(function (n, i) { colours[n] = palette[i % palette.length]; });
    return colours;
  }
  function ticks(lo, hi, n) {
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    [1, 2, 5, 10].some(function (m) { if ((hi - lo) / (step * m) <= n) { step *= m; return true; }
                                      return false; });
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    return out;
  }

  // ``xlabel``: what the x axis counts (labelled events unless said); ``kind``: a class
  // name the chart and its lines carry ("series" unless said)
  function chart(view, colours, xlabel, kind) {
    xlabel = xlabel || "labelled events";
    kind = kind || "series";
    var W = 960, H = 340, L = 56, R = 16, T = 14, B = 36;
    var xs = [], ys = [];
    Object.keys(view.series).forEach(function (name) {
      view.series[name].forEach(function (p) {
        xs.push(p.labels); if (p.value !== null) ys.push(p.value);
      });
    });
    view.markers.forEach(function (m) { xs.push(m.labels); });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) x1 = x0 + 1;
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (!isFinite(y0)) { y0 = 0; y1 = 1; }
    var pad = Math.max((y1 - y0) * 0.08, 0.01);
    y0 -= pad; y1 += pad;
    function X(v) { return L + (v - x0) / (x1 - x0) * (W - L - R); }
    function Y(v) { return T + (y1 - v) / (y1 - y0) * (H - T - B); }

    var svg = svgEl("svg", {class: kind === "series" ? "chart" : "chart " + kind,
                            viewBox: "0 0 " + W + " " + H, role: "img",
                            "aria-label": view.metric + " by " + xlabel});
    ticks(y0, y1, 5).forEach(function (v) {
      svg.appendChild(svgEl("line", {class: "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v)}));
      var t = svgEl("text", {x: L - 6, y: Y(v) + 4, "text-anchor": "end"});
      t.textContent = Number(v.toFixed(6)); svg.appendChild(t);
    });
    ticks(x0, x1, 8).forEach(function (v) {
      var t = svgEl("text", {x: X(v), y: H - B + 16, "text-anchor": "middle"});
      t.textContent = v.toLocaleString("en"); svg.appendChild(t);
    });
    svg.appendChild(svgEl("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
    svg.appendChild(svgEl("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
    var xl = svgEl("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"});
    xl.textContent = xlabel; svg.appendChild(xl);
    var yl = svgEl("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
                            transform: "rotate(-90 12 " + (T + H - B) / 2 + ")"});
    yl.textContent = view.metric + " (window " + view.window + ")"; svg.appendChild(yl);

    Object.keys(view.series).forEach(function (name) {
      var pts = view.series[name].filter(function (p) { return p.value !== null; })
        .map(function (p) { return X(p.labels).toFixed(1) + "," + Y(p.value).toFixed(1); });
      var line = svgEl("polyline", {class: kind, "data-model": name,
        "data-points": pts.length, points: pts.join(" "), fill: "none",
        stroke: colours[name], "stroke-width": 2, "stroke-linejoin": "round"});
      var title = svgEl("title"); title.textContent = name; line.appendChild(title);
      svg.appendChild(line);
    });
    view.markers.forEach(function (m) {
      var colour = config.markers[m.kind] || "#000";
      var g = svgEl("g", {class: "marker", "data-kind": m.kind, "data-model": m.model});
      var title = svgEl("title");
      title.textContent = m.kind + " \u00b7 " + m.model + " \u00b7 label " + m.labels +
        " \u00b7 " + when(m.at) + "\n" + m.text;
      g.appendChild(title);
      g.appendChild(svgEl("line", {x1: X(m.labels), x2: X(m.labels), y1: T, y2: H - B,
        stroke: colour, "stroke-width": 1.5, "stroke-dasharray": "5 3"}));
      // a wide invisible stroke so the tooltip is easy to hover
      g.appendChild(svgEl("line", {x1: X(m.labels), x2: X(m.labels), y1: T, y2: H - B,
        stroke: "transparent", "stroke-width": 9, "pointer-events": "stroke"}));
      g.appendChild(svgEl("circle", {cx: X(m.labels), cy: T + 4, r: 4, fill: colour}));
      svg.appendChild(g);
    });
    return svg;
  }

  function legend(view, colours) {
    var box = el("p", {class: "legend"});
    Object.keys(view.series).forEach(function (name) {
      var s = el("span"); var sw = el("span", {class: "swatch"});
      sw.style.background = colours[name]; s.appendChild(sw); s.appendChild(
        document.createTextNode(name)); box.appendChild(s);
    });
    Object.keys(config.markers).forEach(function (kind) {
      var s = el("span"); var sw = el("span", {class: "swatch dashed"});
      sw.style.borderColor = config.markers[kind]; s.appendChild(sw);
      s.appendChild(document.createTextNode(kind)); box.appendChild(s);
    });
    return box;
  }

  function metricNames(view) {
    var seen = [];
    view.candidates.forEach(function (c) {
      Object.keys(c.metrics).forEach(function (k) { if (seen.indexOf(k) < 0) seen.push(k); });
    });
    var order = config.metric_order;
    return seen.sort(function (a, b) {
      var ia = order.indexOf(a), ib = order.indexOf(b);
      ia = ia < 0 ? order.length : ia; ib = ib < 0 ? order.length : ib;
      return ia - ib || (a < b ? -1 : a > b ? 1 : 0);
    });
  }

  function candidatesTable(view, colours) {
    var metrics = metricNames(view);
    var rows = view.candidates.map(function (c) {
      var name = el("span"); var sw = el("span", {class: "swatch"});
      sw.style.background = colours[c.name]; name.appendChild(sw);
      name.appendChild(document.createTextNode(c.name + (c.base ? " (from " + c.base + ")" : "")));
      var cells = [name, el("span", {class: "badge " + c.role}, c.role), "v" + c.version,
                   num(c.labels)];
      metrics.forEach(function (m) { cells.push(num(c.metrics[m])); });
      cells.push(c.drift_alarms ? el("span", {class: "alarm"}, c.drift_alarms) : "0");
      return row(cells, {"data-role": c.role, "data-model": c.name});
    });
    var t = table(["candidate", "role", "version", "labels"].concat(metrics, ["drift alarms"]),
                  rows);
    t.id = "candidates";
    return t;
  }

  function markersTable(view) {
    var rows = view.markers.slice().reverse().map(function (m) {
      var kind = el("span", {}, m.kind); kind.style.color = config.markers[m.kind] || "#000";
      return row([m.text, kind, m.model, num(m.labels), when(m.at)], {"data-kind": m.kind});
    });
    var t = table(["what happened", "kind", "model", "label", "at"], rows);
    t.id = "markers";
    return t;
  }

  function segmentsSection(seg, out) {
    out.appendChild(el("h3", {}, "Segments: " + seg.metric + " by " + seg.field));
    var rows = Object.keys(seg.by).sort().map(function (value) {
      var s = seg.by[value];
      return row([value, num(s.n), num(s[seg.metric])]);
    });
    var t = table([seg.field, "labels", seg.metric], rows); t.id = "segments";
    out.appendChild(t);
    out.appendChild(el("p", {id: "gap"}, "largest gap between segments: " + num(seg.gap)));
  }

  function distributionsSection(dists, out) {
    out.appendChild(el("h3", {}, "Input distributions (label-free, Kolmogorov-Smirnov)"));
    var rows = Object.keys(dists).sort().map(function (name) {
      var d = dists[name];
      return row([name, num(d.statistic), num(d.p_value), d.alarms ?
        el("span", {class: "alarm"}, d.alarms) : "0"], {"data-input": name});
    });
    var t = table(["input", "KS statistic", "p-value", "alarms"], rows);
    t.id = "distributions"; out.appendChild(t);
  }

  function qualitySection(dq, out) {
    out.appendChild(el("h3", {}, "Data quality (last " + dq.window + " predictions)"));
    var rows = Object.keys(dq.fields).sort().map(function (name) {
      var f = dq.fields[name];
      var missing = f.missing > 0.05 ? el("span", {class: "alarm"}, num(f.missing)) :
        num(f.missing);
      return row([name, missing, num(f.impute), num(f.clip), num(f.bucket)],
                 {"data-field": name});
    });
    var t = table(["input", "missing", "imputed", "clipped", "bucketed"], rows);
    t.id = "data-quality"; out.appendChild(t);
    out.appendChild(el("p", {id: "freshness"}, "freshness (scored minus event time): mean " +
      num(dq.freshness_s.mean) + " s, max " + num(dq.freshness_s.max) + " s"));
  }

  function searchesSection(searches, out) {
    Object.keys(searches).sort().forEach(function (base) {
      var s = searches[base];
      out.appendChild(el("h3", {}, "Model search of " + base + ": round " + s.round + ", " +
        s.configurations.length + " configurations, " + s.metric +
        (s.done ? " (done)" : " (running)")));
      var alive = {};
      s.configurations.forEach(function (c) { alive[c] = true; });
      var head = ["configuration"].concat(s.rungs.map(function (r) {
        return "rung " + r.rung + " (" + num(r.budget) + " labels)"; }));
      var rows = s.configurations.map(function (c) {
        var cells = [c];
        s.rungs.forEach(function (r) {
          if (!(c in r.scores)) { cells.push(""); return; }
          var kept = r.kept.indexOf(c) >= 0;
          cells.push(el("span", {class: kept ? "kept" : "pruned"},
                        num(r.scores[c]) + (kept ? "" : " pruned")));
        });
        return row(cells, {"data-config": c});
      });
      var t = table(head, rows); t.className = "search"; t.setAttribute("data-base", base);
      out.appendChild(t);
    });
  }

  // a slate pipeline's ranking metrics per model, with each candidate's ROC AUC and log
  // loss over the shown items (its ordinary windowed quality)
  function rankingSection(ranking, view, colours, out) {
    var k = ranking.k;
    out.appendChild(el("h3", {}, "Ranking (top " + k + " shown, windows of " +
      num(ranking.window) + " requests)"));
    var quality = {};
    view.candidates.forEach(function (c) { quality[c.name] = c.metrics; });
    var columns = [["ctr_at_k", "CTR@" + k], ["ndcg_at_k", "NDCG@" + k + " served"],
                   ["rerank_ndcg_at_k", "NDCG@" + k + " own order"],
                   ["coverage", "coverage"], ["popularity_share", "popularity share"]];
    var rows = ranking.models.map(function (m) {
      var cells = [m.name, el("span", {class: "badge " + m.role}, m.role), "v" + m.version,
                   num(m.served), num(m.reranked)];
      columns.forEach(function (c) { cells.push(num(m.metrics[c[0]])); });
      var q = quality[m.name] || {};
      cells.push(num(q.roc_auc), num(q.log_loss));
      // a challenger's estimated CTR@k had it served (SNIPS, with its interval)
      var o = m.metrics;
      cells.push(o.offpolicy_ctr_at_k === undefined ?
        (o.offpolicy_requests ? "matched " + num(o.offpolicy_matched) : "\u2013") :
        num(o.offpolicy_ctr_at_k) + " [" + num(o.offpolicy_ctr_low) + ", " +
        num(o.offpolicy_ctr_high) + "]");
      return row(cells, {"data-ranking-role": m.role, "data-ranking-model": m.name});
    });
    var t = table(["model", "role", "version", "served", "re-ranked"].concat(
      columns.map(function (c) { return c[1]; }),
      ["ROC AUC", "log loss", "off-policy CTR@" + k + " [95%]"]), rows);
    t.id = "ranking"; out.appendChild(t);
    // every model's NDCG@k in its own order: the figure that compares them, over time
    var series = {};
    Object.keys(ranking.series || {}).forEach(function (name) {
      var pts = ranking.series[name].filter(function (p) {
        return p.metrics.rerank_ndcg_at_k !== undefined; });
      if (pts.length) series[name] = pts.map(function (p) {
        return {labels: p.requests, value: p.metrics.rerank_ndcg_at_k}; });
    });
    if (Object.keys(series).length) {
      var svg = chart({series: series, markers: [], metric: "NDCG@" + k + " own order",
                       window: ranking.window}, colours, "completed requests", "ranking");
      svg.id = "ranking-chart"; out.appendChild(svg);
    }
    var r = ranking.requests;
    var line = el("p", {id: "ranking-requests"}, "requests awaiting labels: " + num(r.open) +
      " of " + num(r.capacity) + " \u00b7 completed " + num(r.completed) + " \u00b7 ");
    line.appendChild(r.evicted ? el("span", {class: "alarm"}, "evicted " + num(r.evicted)) :
      document.createTextNode("evicted 0"));
    line.appendChild(document.createTextNode(" \u00b7 late " + num(r.late) +
      " \u00b7 duplicates " + num(r.duplicates)));
    out.appendChild(line);
  }

  function render(view) {
    document.getElementById("pipeline").textContent = view.pipeline;
    document.getElementById("champion").textContent = "Champion: " + championText(view);
    document.title = "riverflow status: " + view.pipeline;
    var updated = document.getElementById("updated");
    updated.className = "muted";
    updated.textContent = "updated " + when(view.updated) + " \u00b7 " + view.metric +
      " over windows of " + view.window + " labelled events" +
      (config.live ? " \u00b7 live, refreshed every " + config.refresh_ms / 1000 + " s"
                   : " \u00b7 report");
    var out = document.createDocumentFragment();
    if (!view.candidates.length) {
      out.appendChild(el("p", {class: "waiting", id: "waiting"},
        "Waiting for labels: no candidate has been evaluated yet."));
    } else {
      var colours = candidateColours(view);
      out.appendChild(el("h3", {}, view.metric + " by labelled events"));
      var hasPoints = Object.keys(view.series).some(function (n) {
        return view.series[n].length > 0; });
      if (hasPoints || view.markers.length) {
        out.appendChild(chart(view, colours));
        out.appendChild(legend(view, colours));
      } else {
        out.appendChild(el("p", {class: "waiting"}, "Waiting for labels: no points yet."));
      }
      out.appendChild(el("h3", {}, "Candidates"));
      out.appendChild(candidatesTable(view, colours));
    }
    if (view.ranking) rankingSection(view.ranking, view, candidateColours(view), out);
    if (view.markers.length) {
      out.appendChild(el("h3", {}, "Decisions and alarms"));
      out.appendChild(markersTable(view));
    }
    if (view.segments) segmentsSection(view.segments, out);
    if (Object.keys(view.distributions).length) distributionsSection(view.distributions, out);
    if (view.data_quality && view.data_quality.fields) qualitySection(view.data_quality, out);
    if (view.searches && Object.keys(view.searches).length) searchesSection(view.searches, out);
    if (Object.keys(view.anomaly).length) {
      out.appendChild(el("h3", {}, "Anomaly scores (HalfSpaceTrees)"));
      var t = table(["statistic", "value"], Object.keys(view.anomaly).sort().map(function (k) {
        return row([k, num(view.anomaly[k])]); }));
      t.id = "anomaly"; out.appendChild(t);
    }
    var main = document.getElementById("main");
    main.replaceChildren(out);
  }

  function refresh() {
    fetch("/status.json", {cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (view) { current = view; render(view); })
      .catch(function (err) {
        var updated = document.getElementById("updated");
        updated.className = "stale";
        updated.textContent = "monitor unreachable (" + err.message + "), showing data of " +
          when(current.updated);
      })
      .then(function () { setTimeout(refresh, config.refresh_ms); });
  }

  var current = JSON.parse(document.getElementById("view").textContent);
  render(current);
  if (config.live) setTimeout(refresh, config.refresh_ms);
})();
